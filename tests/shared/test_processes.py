"""Process groups: everything started is stopped, descendants in other sessions included."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from shared.errors import DeploymentError, Terminated
from shared.processes import (
    ManagedProcess,
    ProcessGroups,
    descendant_groups,
    free_port,
    group_alive,
    tagged_processes,
    wait_for_port,
)

# A parent that starts a child in its own session (as flower-superlink starts flower-superexec),
# prints the child's pid, then sleeps.
SPAWNER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print("child", child.pid, flush=True)
time.sleep(600)
"""
STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(600)
"""


def _child_pid(proc: ManagedProcess) -> int:
    return int(proc.wait_for_output(r"child (\d+)", timeout=30).group(1))


def _all_gone(groups: set[int], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(group_alive(g) for g in groups):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checked on Linux only")
def test_stop_all_reaches_descendants_in_other_sessions(tmp_path: Path) -> None:
    # Prepare
    with ProcessGroups(tmp_path, grace=5) as procs:
        parent = procs.start("spawner", [sys.executable, "-c", SPAWNER])
        child = _child_pid(parent)

        # Execute
        groups = procs.groups()

    # Assert: the child had its own group, was found by its tag, and is gone with its parent
    assert {parent.pgid, child} <= groups
    assert _all_gone(groups)
    assert not tagged_processes(procs.tag)


def test_exit_on_error_and_on_interrupt_stops_everything(tmp_path: Path) -> None:
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        # Prepare / Execute
        with pytest.raises(type(error)), ProcessGroups(tmp_path / type(error).__name__, grace=5) as procs:
            procs.start("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
            raise error

        # Assert
        assert _all_gone(procs.groups())


def test_sigterm_to_the_supervisor_stops_its_children(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), ProcessGroups(tmp_path, grace=5) as procs:
        procs.start("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert _all_gone(procs.groups())
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_process_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    with ProcessGroups(tmp_path, grace=1) as procs:
        stubborn = procs.start("stubborn", [sys.executable, "-c", STUBBORN])
        stubborn.wait_for_output("ready", timeout=30)
        started = time.monotonic()
        procs.stop(stubborn)
        assert stubborn.returncode == -signal.SIGKILL
        assert time.monotonic() - started < 10
    assert _all_gone(procs.groups())


def test_kill_is_immediate_sigkill_of_the_group(tmp_path: Path) -> None:
    with ProcessGroups(tmp_path, grace=5) as procs:
        sleeper = procs.start("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
        procs.kill(sleeper)
        assert sleeper.returncode == -signal.SIGKILL
        assert not group_alive(sleeper.pgid)


def test_readiness_failures_say_what_happened(tmp_path: Path) -> None:
    with ProcessGroups(tmp_path, grace=5) as procs:
        quits = procs.start("quits", [sys.executable, "-c", "print('bad certificate'); raise SystemExit(3)"])
        with pytest.raises(DeploymentError, match=r"(?s)quits exited with status 3.*bad certificate"):
            quits.wait_for_output("never printed", timeout=30)
        silent = procs.start("silent", [sys.executable, "-c", "import time; time.sleep(600)"])
        with pytest.raises(DeploymentError, match="not ready after 1 s"):
            silent.wait_for_output("never printed", timeout=1)
        with pytest.raises(DeploymentError, match="exited with status 3"):
            wait_for_port("127.0.0.1", free_port(), 5, proc=quits)
        with pytest.raises(ValueError, match="already"):
            procs.start("silent", [sys.executable, "-c", "pass"])


def test_descendant_groups_follow_parent_links() -> None:
    # (pid, ppid, pgid): 10 -> 11 -> 12 (own group 12), 20 unrelated
    table = [(10, 1, 10), (11, 10, 10), (12, 11, 12), (20, 1, 20)]
    assert descendant_groups(table, {10}) == {10, 12}
    assert descendant_groups(table, {20}) == set()


def test_a_restarted_process_reads_only_its_own_output(tmp_path: Path) -> None:
    # Prepare: an earlier process of the same name wrote the log (e.g. before a crash)
    with ProcessGroups(tmp_path, grace=5) as first:
        first.start("node", [sys.executable, "-c", "print('SuperNode ID: 1')"]).wait(timeout=30)

    # Execute
    with ProcessGroups(tmp_path, grace=5) as second:
        again = second.start("node", [sys.executable, "-c", "print('refused')"])
        again.wait(timeout=30)

        # Assert: the old line is kept in the file but is not this process's output
        assert "SuperNode ID: 1" in (tmp_path / "node.log").read_text()
        assert again.output() == "refused\n"
        with pytest.raises(DeploymentError, match="exited with status 0"):
            again.wait_for_output("SuperNode ID", timeout=5)
