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
