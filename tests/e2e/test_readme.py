"""The README's deployment recipe, run as written: real ``carefl`` commands on 127.0.0.1.

``RECIPE`` is read out of README.md's "By hand, as a consortium would" block, so the two
cannot drift apart. The test runs
it in an empty folder with two changes only: every port is replaced by a free one (the machine
may be shared), and the run is shortened to 1 round of 1 local epoch. Long-running commands
(``carefl server``, ``carefl node``) start as processes and must be ready before the next line;
the others must exit 0. It then submits a run the ServerApp refuses (a wrong backbone SHA-256),
which must stop with the ServerApp's own error, of its kind, in one line.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.errors import EXIT_INTEGRITY
from shared.executables import flower_env
from shared.processes import ProcessGroups, free_port

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- recipe:deployment -->"


def readme_recipe() -> str:
    """The README's deployment block: the bash code block right after :data:`MARKER`."""
    text = README.read_text(encoding="utf-8")
    assert MARKER in text, f"{README} lost its {MARKER} marker"
    block = text.split(MARKER, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return block


RECIPE = readme_recipe()
"""The README's block, as a user copies it."""

SHORT_RUN = {"num-rounds=5": "num-rounds=1 local-epochs=1"}
READY = {"server": "SuperLink ready on 127.0.0.1", "node": r"SuperNode ID: \d+"}
CAREFL = [sys.executable, "-m", "server.local.cli"]
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process tracking is checked on Linux only")


def recipe_commands(text: str, ports: dict[str, str]) -> list[list[str]]:
    """The ``carefl`` argument lists of ``text``: comments and optional ``[...]`` flags dropped,
    ports replaced by ``ports``, the run shortened by :data:`SHORT_RUN`."""
    commands = []
    for line in text.strip().splitlines():
        argv = [a for a in shlex.split(line, comments=True) if not (a.startswith("[") and a.endswith("]"))]
        assert argv[0] == "carefl", line
        argv = [SHORT_RUN.get(a, a) for a in argv[1:]]
        argv = [re.sub(r"\b(8000|909[4-6])\b", lambda m: ports[m.group(1)], a) for a in argv]
        if argv[0] == "server":
            argv += ["--port", ports["8000"]]
        commands.append(argv)
    return commands


@pytest.fixture()
def procs(tmp_path: Path) -> Iterator[ProcessGroups]:
    with ProcessGroups(tmp_path / "test-logs", grace=10) as groups:
        yield groups


def _env() -> dict[str, str]:
    """Flower's offline switches, and this checkout first on the path (the commands run elsewhere)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**flower_env(), "PYTHONPATH": path}


def _carefl(argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CAREFL, *argv], cwd=cwd, env={**os.environ, **_env()},
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_the_readme_deployment_recipe_runs_as_written(procs: ProcessGroups, tmp_path: Path) -> None:
    # Prepare
    ports = {name: str(free_port()) for name in ("8000", "9094", "9095", "9096")}
    env = _env()
    outputs: dict[str, str] = {}

    # Execute: line by line, as an operator types them
    for number, argv in enumerate(recipe_commands(RECIPE, ports)):
        name = f"{number}-{argv[0]}"
        if argv[0] in READY:
            started = procs.start(name, [*CAREFL, *argv], env=env, cwd=tmp_path)
            started.wait_for_output(READY[argv[0]], timeout=180)
            continue
        done = _carefl(argv, tmp_path, timeout=900)
        outputs[argv[0]] = done.stdout + done.stderr
        assert done.returncode == 0, f"`carefl {shlex.join(argv)}` exited {done.returncode}:\n{outputs[argv[0]]}"
    refused = _carefl(["federate", "--run-config", f"backbone-sha256='{'0' * 64}' num-rounds=1"], tmp_path, timeout=300)

    # Assert: a model came out, the hospital's audit log verifies against its ledger
    assert (tmp_path / "runs" / "x" / "model.pt").is_file() and (tmp_path / "ck").is_dir()
    assert "round 1/1:" in outputs["federate"]
    assert outputs["audit"].startswith("ok: ") and "sealed with the site key" in outputs["audit"]
    assert "1 charged round(s) of the privacy ledger each logged" in outputs["audit"]
    # ... and a run the ServerApp refuses ends with its own error, of its kind, in one line
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == EXIT_INTEGRITY, refused.stdout + refused.stderr
    assert len(errors) == 1 and "but the run config requires 0000000000000000" in errors[0]
    assert "Traceback" not in refused.stdout + refused.stderr
