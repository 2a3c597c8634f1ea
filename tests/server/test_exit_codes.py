"""Each kind of error has its own exit status, so a script can tell a typo from tampering.

2 usage or input, 3 integrity, 4 deployment, 5 refusal: each is reached here through a real
``carefl`` command, with one ``error:`` line and no traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from client.policy import SitePolicy
from client.site import POLICY_FILE
from server.flwr_cli import CONNECTION_NAME, Connection, write_flwr_home
from server.local.cli import main
from server.local.demo import state_key
from shared.errors import (
    EXIT_DEPLOYMENT,
    EXIT_INTEGRITY,
    EXIT_REFUSED,
    EXIT_USAGE,
    CareFLError,
    ConfigError,
    DeploymentError,
    InputError,
    IntegrityError,
    RefusalError,
)
from shared.processes import free_port


def _one_error_line(capsys: pytest.CaptureFixture[str], *, traceback_free: bool = True) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert not (traceback_free and "Traceback" in err), err
    return errors[0]


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        (InputError, EXIT_USAGE),
        (ConfigError, EXIT_USAGE),
        (IntegrityError, EXIT_INTEGRITY),
        (DeploymentError, EXIT_DEPLOYMENT),
        (RefusalError, EXIT_REFUSED),
    ],
)
def test_each_kind_declares_its_status(kind: type[CareFLError], status: int) -> None:
    assert kind.exit_code == status
    assert len({EXIT_USAGE, EXIT_INTEGRITY, EXIT_DEPLOYMENT, EXIT_REFUSED}) == 4


def test_a_typo_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    code = main(["demo", "--task", "brain-mri", "--out", str(tmp_path / "run"), "--state-dir", str(tmp_path / "s")])

    # Assert
    assert code == EXIT_USAGE
    assert "brain-mri" in _one_error_line(capsys)


def test_a_tampered_ledger_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a hospital's ledger whose header was edited by hand
    site = tmp_path / "site"
    assert main(["budget", "--site-dir", str(site), "--init", "--site", "Hungary"]) == 0
    ledger = site / "privacy-ledger.json"
    ledger.write_text(ledger.read_text().replace("Hungary", "Hungary!"))
    capsys.readouterr()

    # Execute
    code = main(["budget", "--site-dir", str(site)])

    # Assert
    assert code == EXIT_INTEGRITY
    assert str(ledger) in _one_error_line(capsys)


def test_an_unreachable_superlink_exits_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: `carefl server`'s state folder naming a SuperLink that is not running
    state = tmp_path / "superlink"
    write_flwr_home(state / "flwr-home", Connection(f"127.0.0.1:{free_port()}", None, CONNECTION_NAME))

    # Execute
    code = main(["federate", "--state-dir", str(state), "--run-config", "num-rounds=1"])

    # Assert
    assert code == EXIT_DEPLOYMENT
    assert "flwr run" in _one_error_line(capsys)


@pytest.mark.slow
def test_a_request_every_site_declines_exits_5(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: each of the demo's three hospitals (Cleveland pretrains the backbone) already has its
    # operator's policy, capping epsilon per run at 1 (the demo never replaces it); the demo asks
    # for its default 3
    out, state = tmp_path / "run", tmp_path / "state"
    strict = SitePolicy(max_epsilon_per_run=1.0).to_toml()
    for index in range(3):
        site_dir = state / "sites" / state_key(out) / "transfer" / f"site-{index}"
        site_dir.mkdir(parents=True)
        (site_dir / POLICY_FILE).write_text(strict, encoding="utf-8")
    argv = ["demo", "--rounds", "1", "--local-epochs", "1", "--no-compare", "--out", str(out), "--state-dir", str(state)]

    # Execute
    code = main(argv)

    # Assert
    assert code == EXIT_REFUSED
    # Flower's own logger may still write to a stream an earlier test's capture closed.
    assert "min-sites" in _one_error_line(capsys, traceback_free=False)
    assert not out.exists()
