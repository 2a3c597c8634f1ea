"""Shared fixtures: real data locations and a pretrained heart backbone registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.offline import configure_flower_env

configure_flower_env()

E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every end-to-end test is ``slow``: ``make test-fast`` (``-m "not slow"``) leaves them out."""
    for item in items:
        if E2E in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slow)

REPO = Path(__file__).resolve().parents[1]
PNEUMONIA_NPZ = REPO.parent / "shared" / "data" / "pneumoniamnist.npz"


@pytest.fixture(scope="session")
def pneumonia_npz() -> Path:
    """The real PneumoniaMNIST train+val file beside the checkout."""
    if not PNEUMONIA_NPZ.is_file():
        pytest.skip(f"{PNEUMONIA_NPZ} not found")
    return PNEUMONIA_NPZ


@pytest.fixture(scope="session")
def heart_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding the Cleveland-pretrained heart backbone (short pretraining)."""
    from server.pretrain import pretrain_heart

    registry = tmp_path_factory.mktemp("registry")
    pretrain_heart(registry, epochs=5)
    return registry
