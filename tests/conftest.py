"""Shared fixtures: real data locations and a pretrained heart backbone registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.offline import configure_flower_env

configure_flower_env()

E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every end-to-end test is ``slow``: ``make test-fast`` (``-m "not slow"``) leaves them out.

    The files are then put in the order :func:`interleaved` gives, which ``make test`` keeps
    (``--no-loadscope-reorder``).
    """
    for item in items:
        if E2E in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slow)
    items[:] = interleaved(items)


def interleaved(items: list[pytest.Item]) -> list[pytest.Item]:
    """``items`` file by file: each end-to-end file (the largest first) followed by an even share of the others.

    A federation spends most of its time waiting on Flower's polls. With its file next to a share
    of CPU-bound unit-test files, the xdist worker that is free takes the next file in this order,
    so one worker's federation overlaps the other's unit tests instead of two federations waiting
    side by side at the end (xdist's default order puts files with few tests last). The other
    files keep xdist's default order, most tests first; each file keeps its own order.
    """
    files: dict[Path, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(Path(str(item.fspath)), []).append(item)
    e2e = sorted((f for f in files if E2E in f.parents), key=lambda f: -f.stat().st_size)
    rest = sorted((f for f in files if E2E not in f.parents), key=lambda f: -len(files[f]))
    share = -(-len(rest) // max(len(e2e), 1))
    order = [f for i, path in enumerate(e2e) for f in (path, *rest[i * share : (i + 1) * share])]
    order += rest[len(e2e) * share :]
    return [item for path in order for item in files[path]]

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
