"""The node's SuperNode is Flower's own with one sleep shortened: the 3 s idle wait between pulls."""

from __future__ import annotations

import time
import types

import flwr.supernode.start_client_internal as internal
import pytest

from client.runtime.supernode import CappedSleep, cap_idle_poll, capped_supernode_command, flower_arguments


def test_this_flowers_supernode_idles_with_the_time_module_so_the_cap_applies() -> None:
    # The guard against a Flower upgrade: the idle wait is `time.sleep(3)` in this module
    source = internal.__loader__.get_source(internal.__name__)  # type: ignore[union-attr]
    assert internal.time is time
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source


def test_the_caps_shorten_the_idle_and_the_local_waits() -> None:
    # Prepare
    module = types.ModuleType("fake_flower")
    module.time = time  # type: ignore[attr-defined]
    cap_idle_poll(module, 0.2, local=0.02)

    # Execute
    start = time.monotonic()
    module.time.sleep(3)  # type: ignore[attr-defined]
    idle = time.monotonic() - start
    start = time.monotonic()
    module.time.sleep(0.5)  # type: ignore[attr-defined]
    local = time.monotonic() - start

    # Assert: the 3 s idle wait became 0.2 s, the 0.5 s local wait 0.02 s; the rest of `time` is there
    assert 0.19 <= idle < 1.0
    assert 0.019 <= local < 0.19
    assert isinstance(module.time, CappedSleep) and module.time.monotonic is time.monotonic  # type: ignore[attr-defined]


def test_a_module_without_the_time_module_is_refused() -> None:
    with pytest.raises(RuntimeError, match="check the Flower version"):
        cap_idle_poll(types.ModuleType("moved"), 0.5)


def test_the_command_line_carries_flowers_arguments_unchanged() -> None:
    argv = capped_supernode_command(["--superlink", "127.0.0.1:9092", "--insecure"], idle_poll=0.25)
    assert argv[argv.index("--idle-poll") + 1] == "0.25"
    assert flower_arguments(argv) == ["--superlink", "127.0.0.1:9092", "--insecure"]
    with pytest.raises(ValueError):
        flower_arguments(["flower-supernode", "--superlink", "x"])
