"""`carefl pretrain` and `carefl backbones`: no untrained backbone, no verification that fails quietly."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.local.cli import main
from server.pretrain import HEART_BACKBONE, pretrain_heart
from shared.errors import EXIT_INTEGRITY, EXIT_USAGE


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("epochs", ["0", "-3"])
def test_pretrain_refuses_fewer_than_one_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str], epochs: str) -> None:
    # Prepare
    registry = tmp_path / "registry"

    # Execute
    code = main(["pretrain", "--registry", str(registry), "--epochs", epochs])

    # Assert: exit 2, one line, nothing registered (on main: exit 0 and an AUC-0.343 backbone)
    errors = _error_lines(capsys.readouterr().err)
    assert code == EXIT_USAGE
    assert len(errors) == 1 and "--epochs" in errors[0] and epochs in errors[0]
    assert not registry.exists()


def test_backbones_verify_fails_with_integrity_status_naming_the_backbone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a registered backbone whose weights file was altered afterwards
    registry = tmp_path / "registry"
    done = pretrain_heart(registry, epochs=1)
    weights = done.folder / done.manifest.filename
    weights.write_bytes(weights.read_bytes() + b"x")

    # Execute
    code = main(["backbones", "--registry", str(registry), "--verify"])

    # Assert: the table is still shown; one error line; exit 3 (on main: exit 0)
    captured = capsys.readouterr()
    errors = _error_lines(captured.err)
    assert code == EXIT_INTEGRITY
    assert "Backbones" in captured.out
    assert len(errors) == 1 and HEART_BACKBONE in errors[0] and "failed verification" in errors[0]
    assert "mobilenet_v2-imagenet" not in errors[0]


def test_backbones_verify_passes_when_every_file_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    registry = tmp_path / "registry"
    pretrain_heart(registry, epochs=1)

    # Execute
    code = main(["backbones", "--registry", str(registry), "--verify"])

    # Assert
    assert code == 0
    assert _error_lines(capsys.readouterr().err) == []


def test_backbones_lists_every_builtin_and_marks_weights_not_on_this_machine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a wide console, so that no name is cut; an empty hub cache (only MobileNetV2 is installed)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = {
        "mobilenet_v2-imagenet": 1280, "vgg16-imagenet": 512, "resnet18-imagenet": 512,
        "resnet50-imagenet": 2048, "densenet121-imagenet": 1024, "efficientnet_b0-imagenet": 1280,
    }  # fmt: skip

    # Execute
    code = main(["backbones", "--registry", str(tmp_path / "registry"), "--verify"])

    # Assert: one row per built-in with its feature width; absent weights are no failure (exit 0)
    captured = capsys.readouterr()
    rows = {line.split("│")[1].strip(): line for line in captured.out.splitlines() if line.count("│") > 2}
    assert code == 0 and _error_lines(captured.err) == []
    for name, width in expected.items():
        assert f" {width} " in rows[name]
        assert ("verified" if name == "mobilenet_v2-imagenet" else "not on this machine") in rows[name]
