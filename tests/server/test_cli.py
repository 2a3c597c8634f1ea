"""The command line: bad input gives one clear line, the exit status of its kind, and writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from server.local.cli import main
from shared.errors import EXIT_INTEGRITY, EXIT_USAGE


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def _assert_refused(code: int, err: str, *needles: str, out: Path, status: int = EXIT_USAGE) -> None:
    assert code == status
    assert "Traceback" not in err
    # Progress lines (e.g. "loaded ... images") may come first; the error is one `error:` line.
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.fixture()
def base(tmp_path: Path) -> list[str]:
    return ["demo", "--out", str(tmp_path / "run"), "--state-dir", str(tmp_path / "state")]


def test_unknown_task(base: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run([*base, "--task", "brain-mri"], capsys)
    _assert_refused(code, err, "brain-mri", "task", out=tmp_path / "run")


def test_missing_data_file(base: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.npz"
    code, err = _run([*base, "--task", "chest-xray", "--data", str(missing)], capsys)
    _assert_refused(code, err, "nope.npz", out=tmp_path / "run")


def test_corrupt_npz(
    base: list[str], tmp_path: Path, pneumonia_npz: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(pneumonia_npz.read_bytes()[:5000])
    code, err = _run([*base, "--task", "chest-xray", "--data", str(corrupt)], capsys)
    _assert_refused(code, err, "corrupt.npz", out=tmp_path / "run")


def test_image_folder_with_a_non_image(
    base: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    for label in ("normal", "pneumonia"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (28, 28), color=40 * i).save(folder / label / f"{i}.png")
    (folder / "normal" / "scan.png").write_text("this is not an image")
    code, err = _run([*base, "--task", "chest-xray", "--data", str(folder)], capsys)
    _assert_refused(code, err, "scan.png", out=tmp_path / "run")


def test_csv_with_wrong_columns(base: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "heart.csv"
    csv.write_text("age,sex,dataset\n63,Male,Cleveland\n")
    code, err = _run([*base, "--data", str(csv)], capsys)
    _assert_refused(code, err, "heart.csv", "chol", out=tmp_path / "run")


def test_csv_where_every_patient_is_sick_is_refused_before_federating(
    base: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: every `num` > 0 (on main: trained, accuracy 1.000 at every site in the model card)
    from shared.tasks import heart

    frame = heart.load_frame()
    frame["num"] = 1
    csv = tmp_path / "all_sick.csv"
    frame.to_csv(csv, index=False)

    # Execute
    code, err = _run([*base, "--data", str(csv)], capsys)

    # Assert
    _assert_refused(code, err, "all_sick.csv", "holds only class 1", "Hungary 1: 172", out=tmp_path / "run")
    assert not (tmp_path / "state" / "sites").exists()


def test_unknown_backbone(base: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run([*base, "--backbone", "resnet-9000"], capsys)
    _assert_refused(code, err, "resnet-9000", out=tmp_path / "run")


def test_tampered_weights_file(
    base: list[str], tmp_path: Path, pneumonia_npz: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from shared.backbones import BackboneRegistry

    good = BackboneRegistry(hub_dir=tmp_path / "hub", allow_download=False).resolve("mobilenet_v2-imagenet")
    bad = tmp_path / "mobilenet_v2-b0353104.pth"
    shutil.copyfile(good.path, bad)
    with bad.open("r+b") as handle:
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    argv = [*base, "--task", "chest-xray", "--data", str(pneumonia_npz), "--weights", str(bad)]
    code, err = _run(argv, capsys)
    _assert_refused(code, err, "SHA-256", out=tmp_path / "run", status=EXIT_INTEGRITY)


def test_output_folder_not_empty(base: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("results of another study")
    code, err = _run(base, capsys)
    assert code == EXIT_USAGE and "not empty" in err
    assert (out / "keep.txt").read_text() == "results of another study"


def test_output_folder_in_an_unwritable_place_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: --out under a file (root ignores mode bits; the same probe sees read-only mounts)
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    out = blocker / "run"

    # Execute: on main the whole demo trained, then an OSError traceback
    code, err = _run(["demo", "--out", str(out), "--state-dir", str(tmp_path / "state")], capsys)

    # Assert
    _assert_refused(code, err, f"run folder {out}", "choose another --out", out=out)
    assert not (tmp_path / "state").exists()


def test_state_dir_in_an_unwritable_place_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    blocker = tmp_path / "state.txt"
    blocker.write_text("not a folder")

    # Execute
    code, err = _run(["demo", "--out", str(tmp_path / "run"), "--state-dir", str(blocker / "s")], capsys)

    # Assert
    _assert_refused(code, err, f"{blocker}", "--state-dir", out=tmp_path / "run")


def test_image_size_beyond_the_machines_memory_is_refused_before_federating(
    base: list[str], tmp_path: Path, pneumonia_npz: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute: on main the run died allocating tens of GB inside Ray
    argv = [*base, "--task", "chest-xray", "--data", str(pneumonia_npz), "--image-size", "10000"]
    code, err = _run(argv, capsys)

    # Assert
    _assert_refused(code, err, "--image-size 10000 needs about", "GiB this machine has available", out=tmp_path / "run")
    assert not (tmp_path / "state" / "sites").exists()


@pytest.mark.slow
def test_heart_demo_writes_a_complete_run_folder(
    base: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = main([*base, "--rounds", "1", "--local-epochs", "1"])
    printed = capsys.readouterr().out

    # Assert
    assert code == 0
    out = tmp_path / "run"
    card = json.loads((out / "model_card.json").read_text())
    dropped = {"Hungary": 33, "Switzerland": 77, "VA Long Beach": 70}
    assert card["data"]["dropped_rows_per_site"] == dropped
    assert "Hungary: 172 train / 89 held-out, 33 dropped (a missing value)" in " ".join(printed.split())
    assert card["task"] == "heart-disease"
    assert card["sites"] == ["Hungary", "Switzerland", "VA Long Beach"]
    assert set(card["comparison"]) == {"federated transfer", "each site alone", "federated from scratch"}
    assert len(card["backbone"]["sha256"]) == 64
    for name in ("metrics.csv", "metrics.json", "scratch_metrics.csv", "model.pt", "metrics.png"):
        assert (out / name).is_file(), name


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--sites", "3"], "--sites applies to chest-xray only"),
        (["--alpha", "0.5", "--image-size", "32"], "--alpha, --image-size applies to chest-xray only"),
        (["--no-dp", "--epsilon", "1"], "--epsilon sets the DP-SGD budget, which --no-dp turns off"),
        (["--no-dp", "--accountant", "prv"], "--accountant sets the DP-SGD budget"),
        (["--deployment", "--no-compare"], "--no-compare does nothing with --deployment"),
    ],
)
def test_a_flag_the_run_would_ignore_is_refused_naming_it(
    flags: list[str], named: str, base: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run([*base, *flags], capsys)
    _assert_refused(code, err, named, out=tmp_path / "run")


@pytest.mark.parametrize(
    ("run_config", "named"),
    [("num-rounds=1 2", "'2' is not a key=value pair"), ("learnig-rate=0.1", "learnig-rate")],
    ids=["stray-token", "typo-key"],
)
def test_a_federate_run_config_is_checked_before_anything_is_looked_up(
    run_config: str, named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute: no SuperLink state at all; the run config's fault is what the user must hear
    code, err = _run(["federate", "--state-dir", str(tmp_path / "none"), "--run-config", run_config], capsys)

    # Assert
    assert code == EXIT_USAGE
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], err


def test_run_folders_of_the_same_name_get_their_own_hospitals(tmp_path: Path) -> None:
    from server.local.demo import state_key

    # Prepare / Execute
    first, second = state_key(tmp_path / "a" / "run"), state_key(tmp_path / "b" / "run")

    # Assert: distinct ledgers, but the same --out (a --resume) finds its own again
    assert first != second
    assert first.startswith("run-") and state_key(tmp_path / "a" / "run") == first
