"""What the server observes during a run: per-site metrics, bytes, the final model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from server.metrics import SiteRoundMetrics

RoundListener = Callable[[int, list[SiteRoundMetrics]], None]


@dataclass
class FederationRecorder:
    """Collects the observable results of one federated run.

    Attributes
    ----------
    rows : list[SiteRoundMetrics]
        Federated evaluation of each site, by the model measured: row ``round`` = ``r`` is the global
        model after round ``r`` (0: the initial model, measured when sites evaluate what they receive
        in round 1's fit; see :class:`server.strategy.DeltaMixin`).
    upload_bytes : dict[int, list[int]]
        Per round, the serialized bytes each client uploaded.
    backbone_bytes : dict[int, int]
        Per node id, the bytes of backbone weights sent to it (once).
    final_parameters : list[np.ndarray] | None
        The global exchanged tensors after the last round.
    failures : dict[int, list[str]]
        Per round, the reasons of failed client replies.
    dropped_rows : dict[str, int]
        Per site, the rows of its raw data its preprocessing left out (as the site reports).
    class_balance : dict[str, dict[str, dict[str, int]]]
        Per site, its records per class label in its training and validation parts (as the site reports).
    training_privacy : dict[int, dict[str, tuple[float, float]]]
        Per round, per site, the (epsilon, delta) of the run the site reported when it trained that
        round (DP only).
    listeners : list[RoundListener]
        Called with the round of the model measured and its rows after each evaluation.
    """

    rows: list[SiteRoundMetrics] = field(default_factory=list)
    upload_bytes: dict[int, list[int]] = field(default_factory=dict)
    backbone_bytes: dict[int, int] = field(default_factory=dict)
    final_parameters: list[np.ndarray] | None = None
    failures: dict[int, list[str]] = field(default_factory=dict)
    dropped_rows: dict[str, int] = field(default_factory=dict)
    class_balance: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    training_privacy: dict[int, dict[str, tuple[float, float]]] = field(default_factory=dict)
    listeners: list[RoundListener] = field(default_factory=list)

    def add_round(self, server_round: int, rows: list[SiteRoundMetrics]) -> None:
        """Store the evaluation of the model after ``server_round`` and notify listeners."""
        ordered = sorted(rows, key=lambda r: r.site)
        self.rows.extend(ordered)
        for listener in self.listeners:
            listener(server_round, ordered)

    def has_round(self, server_round: int) -> bool:
        """Whether the model after ``server_round`` has rows already."""
        return any(r.round == server_round for r in self.rows)

    def add_training_privacy(self, server_round: int, site: str, privacy: tuple[float, float] | None) -> None:
        """Store the (epsilon, delta) ``site`` reported when it trained ``server_round`` (nothing if None)."""
        if privacy is not None:
            self.training_privacy.setdefault(server_round, {})[site] = privacy

    def add_failures(self, server_round: int, reasons: list[str]) -> None:
        """Store why some clients failed in ``server_round``."""
        if reasons:
            self.failures.setdefault(server_round, []).extend(reasons)
