"""``carefl server`` holds its state folder: a second server on the same folder refuses to start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from server.local.cli import main
from server.service import LOCK_FILE, FederateOptions, hold_state_dir
from shared.errors import EXIT_DEPLOYMENT
from shared.processes import free_port

REPO = Path(__file__).resolve().parents[2]
_HOLDER = """
import sys
from pathlib import Path
from server.service import hold_state_dir
with hold_state_dir(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture()
def held(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A state folder held by another process, as a running ``carefl server`` holds it."""
    state = tmp_path / "state"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(state)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    yield state, holder
    holder.kill()
    holder.wait(timeout=30)


def test_a_second_server_on_the_same_state_dir_is_refused(held, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    state, holder = held

    # Execute
    code = main(["server", "--insecure", "--state-dir", str(state), "--port", str(free_port())])

    # Assert: one line naming the folder and the running server; nothing started or written
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == EXIT_DEPLOYMENT
    assert len(errors) == 1 and str(state) in errors[0] and f"pid {holder.pid}" in errors[0], err
    assert sorted(p.name for p in state.iterdir()) == [LOCK_FILE]


def test_a_crashed_server_releases_its_state_dir(held) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    state, holder = held

    # Execute: the holder dies without cleaning up
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)

    # Assert
    with hold_state_dir(state):
        assert (state / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_a_run_without_registry_dir_uses_the_one_pretrain_registers_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the README's `carefl federate ... --run-config "num-rounds=5"`, from the project folder
    monkeypatch.chdir(tmp_path)

    # Execute
    default = FederateOptions(tmp_path / "state", {"num-rounds": 5}).run_config()
    explicit = FederateOptions(tmp_path / "state", {"registry-dir": "elsewhere"}).run_config()

    # Assert: absolute, since the ServerApp runs in another folder
    assert default["registry-dir"] == str(tmp_path / ".carefl" / "registry")
    assert explicit["registry-dir"] == str(tmp_path / "elsewhere")
