"""The demo says in words whether federated transfer beat each baseline beyond the held-out data's noise."""

from __future__ import annotations

from server.local.demo import summarize, verdict_lines
from server.metrics import SiteRoundMetrics


def _rows(accuracies: dict[str, tuple[float, int]]) -> list[SiteRoundMetrics]:
    return [SiteRoundMetrics(5, site, n, 0.4, acc, 0.8) for site, (acc, n) in accuracies.items()]


def test_a_clear_gain_is_called_better_and_a_small_one_is_not() -> None:
    # Prepare: 2,000 held-out records; transfer 0.90, site alone 0.80 (clear), scratch 0.89 (within noise)
    comparison = {
        "federated transfer": summarize(_rows({"a": (0.90, 1000), "b": (0.90, 1000)})),
        "each site alone": summarize(_rows({"a": (0.80, 1000), "b": (0.80, 1000)})),
        "federated from scratch": summarize(_rows({"a": (0.89, 1000), "b": (0.89, 1000)})),
    }

    # Execute
    alone, scratch = verdict_lines(comparison)

    # Assert
    assert alone.startswith("federated transfer is better than each site alone") and "+0.100" in alone
    assert scratch.startswith(
        "no difference between federated transfer and federated from scratch beyond the noise"
    )


def test_a_loss_is_said_as_one() -> None:
    comparison = {
        "federated transfer": summarize(_rows({"a": (0.70, 500)})),
        "each site alone": summarize(_rows({"a": (0.85, 500)})),
    }
    (line,) = verdict_lines(comparison)
    assert line.startswith("each site alone is better than federated transfer") and "-0.150" in line
