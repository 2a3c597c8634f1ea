"""The consortium's ``carefl app build`` and ``carefl app fingerprint``: the SHA-256 they print is
the one Flower's own ``flwr build`` gives the same app, the one a node checks."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import typer
from typer.testing import CliRunner

from server.cli import register
from shared.executables import executable, flower_env

_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "1.2.3"
dependencies = []

[tool.flwr.app]
publisher = "consortium"

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"
"""


def _app(folder: Path) -> Path:
    (folder / "tinyapp").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(_PYPROJECT)
    (folder / "tinyapp" / "__init__.py").write_text("")
    (folder / "tinyapp" / "client.py").write_text("app = None\n")
    (folder / "tinyapp" / "server.py").write_text("app = None\n")
    return folder


def test_build_and_fingerprint_agree_with_flwr_build(tmp_path: Path) -> None:
    # Prepare
    app = _app(tmp_path / "tinyapp")
    root = typer.Typer()
    register(root)
    runner = CliRunner()
    flwr_out = tmp_path / "flwr-build"
    flwr_out.mkdir()

    # Execute: ours, and Flower's own `flwr build` of the same folder
    built = runner.invoke(root, ["app", "build", "--app-dir", str(app), "--out", str(tmp_path / "out")])
    named = runner.invoke(root, ["app", "build", "--app-dir", str(app), "--out", str(tmp_path / "app.fab")])
    subprocess.run([executable("flwr"), "build", "--app", str(app)], cwd=flwr_out, env={**flower_env()}, check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    (flwr_fab,) = flwr_out.glob("*.fab")
    expected = hashlib.sha256(flwr_fab.read_bytes()).hexdigest()
    from_file = runner.invoke(root, ["app", "fingerprint", str(tmp_path / "app.fab")])
    from_dir = runner.invoke(root, ["app", "fingerprint", str(app)])

    # Assert: the same bytes, the same name, the same SHA-256 everywhere
    assert built.exit_code == 0 and named.exit_code == 0, built.output + named.output
    (ours,) = (tmp_path / "out").glob("*.fab")
    assert ours.name == flwr_fab.name == f"consortium.tinyapp.1-2-3.{expected[:8]}.fab"
    assert ours.read_bytes() == flwr_fab.read_bytes() == (tmp_path / "app.fab").read_bytes()
    assert f"SHA-256 {expected}" in built.output
    assert from_file.output.startswith(f"{expected}  consortium/tinyapp 1.2.3")
    assert from_dir.output.startswith(expected)
