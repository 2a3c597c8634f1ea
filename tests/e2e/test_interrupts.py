"""The ``carefl`` process stops promptly and cleanly: Ctrl-C, SIGTERM, a federation that cannot start.

Each test runs the real console command in its own session, as a user's terminal would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE
from shared.executables import flower_env

STOP_WITHIN_S = 5.0
REPO = Path(__file__).resolve().parents[2]


def _carefl(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``carefl`` with default signal handling (a background shell would ignore SIGINT)."""

    def default_signals() -> None:  # pragma: no cover - runs in the child
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen(
        [sys.executable, "-m", "server.local.cli", *args],
        cwd=REPO, env=flower_env(), stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=default_signals,
    )  # fmt: skip


def _wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, f"{text!r} not seen in {timeout:g} s"
        time.sleep(0.2)


def _demo(tmp_path: Path) -> list[str]:
    return ["demo", "--rounds", "20", "--no-compare", "--out", str(tmp_path / "run"), "--state-dir", str(tmp_path / "state")]


@pytest.mark.parametrize(
    ("sig", "status", "said"),
    [(signal.SIGINT, EXIT_INTERRUPTED, "interrupted; nothing was written."),
     (signal.SIGTERM, EXIT_TERMINATED, "terminated; nothing was written.")],
    ids=["ctrl-c", "sigterm"],
)  # fmt: skip
def test_a_signal_during_a_federation_stops_it_within_seconds(
    sig: signal.Signals, status: int, said: str, tmp_path: Path
) -> None:
    # Prepare: a federation under way (the sites have the backbone; SecAgg+ rounds are running)
    log = tmp_path / "carefl.log"
    proc = _carefl(_demo(tmp_path), log)
    _wait_for(log, "sending backbone", proc)
    time.sleep(2.0)

    # Execute: the signal reaches the command only (not its Ray workers)
    start = time.monotonic()
    os.kill(proc.pid, sig)
    try:
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    elapsed = time.monotonic() - start

    # Assert
    out = log.read_text(errors="replace")
    assert code == status, out
    assert elapsed < STOP_WITHIN_S, f"stopped after {elapsed:.1f} s"
    assert said in out
    assert "SIGTERM received" not in out  # Ray's crash dump
    assert not (tmp_path / "run").exists()


def test_fewer_sites_than_min_sites_is_refused_before_anything_starts(tmp_path: Path, pneumonia_npz: Path) -> None:
    # Prepare
    log = tmp_path / "carefl.log"
    args = ["demo", "--task", "chest-xray", "--data", str(pneumonia_npz), "--sites", "1", "--no-compare",
            "--out", str(tmp_path / "run"), "--state-dir", str(tmp_path / "state")]  # fmt: skip

    # Execute: today's main waited forever after "sending backbone"
    proc = _carefl(args, log)
    try:
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    # Assert
    out = log.read_text(errors="replace")
    assert code == EXIT_USAGE, out
    assert "1 site(s) cannot run a federation that needs `min-sites` = 2" in out
    assert "sending backbone" not in out
