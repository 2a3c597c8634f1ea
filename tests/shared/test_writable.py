"""Places a run writes to are checked before any work: one line naming the place, nothing written.

Root ignores permission bits, so a read-only directory (mode 0555) is tried only as another
user; a file standing where a directory must be is refused for anyone (the same probe sees
read-only mounts).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from client.setup import prepare_site_dir
from server.report.runfolder import refuse_occupied
from shared.atomic import require_writable_dir
from shared.errors import InputError
from shared.processes import ProcessGroups

AS_ROOT = os.geteuid() == 0


@pytest.fixture()
def blocker(tmp_path: Path) -> Path:
    """A regular file where a directory is expected."""
    path = tmp_path / "results.txt"
    path.write_text("not a folder")
    return path


@pytest.fixture()
def read_only(tmp_path: Path) -> Path:
    """A directory nobody but root may write into."""
    if AS_ROOT:
        pytest.skip("root writes into a mode-0555 directory")
    path = tmp_path / "read-only"
    path.mkdir(mode=0o555)
    yield path
    path.chmod(0o755)


def test_a_missing_directory_under_a_writable_one_passes_and_nothing_is_created(tmp_path: Path) -> None:
    # Execute
    require_writable_dir(tmp_path / "a" / "b", what="run folder")

    # Assert: the probe file is gone, and no directory was made
    assert list(tmp_path.iterdir()) == []


def test_a_file_in_the_way_is_named(blocker: Path) -> None:
    # Execute / Assert
    with pytest.raises(InputError, match=rf"site directory {blocker}/site cannot be created: {blocker} is not a directory; x\."):
        require_writable_dir(blocker / "site", what="site directory", hint="x")


def test_a_read_only_directory_is_named_with_the_reason(read_only: Path) -> None:
    # Execute / Assert
    with pytest.raises(InputError, match=rf"run folder {read_only}/run is not writable \({read_only}, where it would be created\): Permission denied"):
        require_writable_dir(read_only / "run", what="run folder")


@pytest.mark.parametrize("place", ["blocker", "read_only"])
def test_a_run_folder_in_an_unwritable_place_is_refused_before_any_work(place: str, request: pytest.FixtureRequest) -> None:
    # Prepare
    parent: Path = request.getfixturevalue(place)

    # Execute / Assert: refuse_occupied runs before the demo or a deployment trains anything
    with pytest.raises(InputError, match=rf"run folder {parent}/run: its parent {parent}.*; choose another --out\."):
        refuse_occupied(parent / "run")


@pytest.mark.parametrize("place", ["blocker", "read_only"])
def test_a_site_directory_in_an_unwritable_place_is_refused(place: str, request: pytest.FixtureRequest) -> None:
    # Prepare
    parent: Path = request.getfixturevalue(place)

    # Execute / Assert: one line instead of an OSError traceback
    with pytest.raises(InputError, match=rf"site directory {parent}/site"):
        prepare_site_dir(parent / "site", site="Hungary")


def test_a_service_whose_log_directory_cannot_be_written_starts_nothing(blocker: Path) -> None:
    # Execute / Assert: a node's or the SuperLink's logs live in its site or state directory
    with pytest.raises(InputError, match=rf"log directory {blocker}/logs cannot be created"):
        with ProcessGroups(blocker / "logs"):
            pass
