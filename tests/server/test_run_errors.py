"""Why a run stopped reaches the operator in one line, of the right kind.

The ServerApp logs one stop line for a CareFL error, and Flower's report of that exception
loses its traceback; ``carefl federate`` reads the line back from the run's log and raises the
same kind of error. (Against a real SuperLink: tests/e2e/test_deployment.py.)
"""

from __future__ import annotations

import io
import logging

import pytest
from flwr.common.logger import FLOWER_LOGGER

from server.app import report_stop
from server.deployment import RunLog
from server.progress import parse_stop_line, stop_line
from server.strategy import FederationStopped
from shared.errors import (
    CareFLError,
    ConfigError,
    DeploymentError,
    InputError,
    IntegrityError,
    RefusalError,
)


@pytest.mark.parametrize("kind", [InputError, ConfigError, IntegrityError, DeploymentError, RefusalError])
def test_a_stop_line_keeps_the_kind_and_the_message(kind: type[CareFLError]) -> None:
    # Execute
    line = stop_line(kind("backbone 'x' is\nnot registered"))
    back = parse_stop_line(f"2026-12-01 ERROR carefl: {line}")

    # Assert
    assert type(back) is kind and str(back) == "backbone 'x' is not registered"
    assert back.exit_code == kind.exit_code


def test_a_subclass_is_reported_as_its_kind() -> None:
    line = stop_line(FederationStopped("round 1: only 0 site(s) trained"))
    assert line == "run stopped (RefusalError): round 1: only 0 site(s) trained"


def _flower_output(error: BaseException) -> str:
    """What Flower's logger writes for ``error`` as it does for a failed ServerApp."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    FLOWER_LOGGER.addHandler(handler)
    try:
        try:
            raise error
        except BaseException as ex:  # noqa: BLE001 - as Flower's runtime does
            FLOWER_LOGGER.error("%s raised an exception", "ServerApp", exc_info=ex)
    finally:
        FLOWER_LOGGER.removeHandler(handler)
    return buffer.getvalue()


def test_flower_reports_a_reported_error_without_its_traceback() -> None:
    # Prepare
    reported = IntegrityError("backbone has SHA-256 1234..., but the run config requires 0000...")
    report_stop(reported)

    # Execute
    quiet = _flower_output(reported)
    other = _flower_output(ValueError("a bug"))

    # Assert: one line for the reported one; any other exception keeps its traceback
    assert quiet == "ServerApp raised an exception\n"
    assert "Traceback (most recent call last)" in other and "ValueError: a bug" in other


def _lines(*lines: str) -> RunLog:
    run_log = RunLog()
    for line in lines:
        run_log(0.0, line)
    return run_log


def test_the_servers_own_error_is_raised_as_its_kind() -> None:
    # Prepare: the end of a failed run's `flwr log`
    run_log = _lines(
        "INFO :      Starting logstream for run_id `5`",
        "ERROR carefl: run stopped (IntegrityError): backbone 'heart-mlp-cleveland' has SHA-256 1c9e..., refused.",
        "ERROR :      ServerApp raised an exception",
        "ERROR :      Exit Code: 201",
    )

    # Execute
    error = run_log.failure(5, "finished:failed", "see its log")

    # Assert
    assert isinstance(error, IntegrityError)
    assert str(error) == "run 5: backbone 'heart-mlp-cleveland' has SHA-256 1c9e..., refused."


def test_another_exception_is_named_from_its_traceback() -> None:
    # Prepare
    run_log = _lines(
        "ERROR :      ServerApp raised an exception",
        "Traceback (most recent call last):",
        '  File "/app/server/app.py", line 90, in main',
        "    raise ValueError('shape mismatch')",
        "ValueError: shape mismatch",
        "ERROR :      Exit Code: 201",
    )

    # Execute
    error = run_log.failure(5, "finished:failed", "`flwr log 5` shows its whole log.")

    # Assert
    assert isinstance(error, DeploymentError)
    assert str(error) == (
        "run 5 ended as finished:failed: its ServerApp raised ValueError: shape mismatch; `flwr log 5` shows its whole log."
    )


def test_after_the_stop_line_nothing_else_is_shown() -> None:
    # Prepare
    shown: list[str] = []
    run_log = RunLog(lambda _, line: shown.append(line))

    # Execute
    for line in ("INFO carefl: CareFL heart-disease (transfer)", "ERROR carefl: run stopped (InputError): no backbone",
                 "ERROR :      ServerApp raised an exception"):  # fmt: skip
        run_log(0.0, line)

    # Assert
    assert shown == ["INFO carefl: CareFL heart-disease (transfer)"]
