"""What a run's ServerApp reports as it goes: a line per round, a live table, and why it stopped."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from logging import INFO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from server.metrics import SiteRoundMetrics, weighted_mean
from shared.errors import CareFLError, ConfigError, DeploymentError, InputError, IntegrityError, RefusalError
from shared.log import log

KINDS: tuple[type[CareFLError], ...] = (InputError, ConfigError, IntegrityError, DeploymentError, RefusalError)
"""The kinds of :mod:`shared.errors`, one exit status each."""
STOP_LINE_PREFIX = "run stopped"
_STOP_LINE = re.compile(rf"{STOP_LINE_PREFIX} \((\w+)\): (.*)$")


def _fmt(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.3f}"


def _max_epsilon(rows: Sequence[SiteRoundMetrics]) -> float:
    values = [r.epsilon for r in rows if math.isfinite(r.epsilon)]
    return max(values) if values else math.nan


ROUND_LINE_PREFIX = "round "


def round_line(server_round: int, total_rounds: int, rows: Sequence[SiteRoundMetrics]) -> str:
    """One line per evaluated model: accuracy/AUC per site, their weighted mean, max epsilon.

    ``round r/R`` is the global model after round ``r``; ``round 0/R (initial model)`` the model
    before any training (evaluated when the sites receive it in round 1, see ``evaluate-in-fit``).
    """
    sites = ", ".join(f"{r.site} {_fmt(r.accuracy)}/{_fmt(r.auc)}" for r in rows)
    mean = f"{_fmt(weighted_mean(rows, 'accuracy'))}/{_fmt(weighted_mean(rows, 'auc'))}"
    return (
        f"{ROUND_LINE_PREFIX}{server_round}/{total_rounds}{_initial(server_round)}: {sites} | mean acc/AUC {mean} "
        f"| max epsilon {_fmt(_max_epsilon(rows))}"
    )


def _initial(server_round: int) -> str:
    return " (initial model)" if server_round == 0 else ""


def stop_line(err: CareFLError) -> str:
    """The one line a ServerApp logs when ``err`` stops the run: its kind and its message.

    ``carefl federate`` reads it back from the run's log (:func:`parse_stop_line`) and raises
    the same kind of error, so the exit status tells a refusal from tampering there too.
    """
    kind = next((k for k in KINDS if isinstance(err, k)), CareFLError)
    message = " ".join(str(err).split())  # one line
    return f"{STOP_LINE_PREFIX} ({kind.__name__}): {message}"


def parse_stop_line(text: str) -> CareFLError | None:
    """The error of a :func:`stop_line` (its kind, its message), or None if ``text`` is not one."""
    match = _STOP_LINE.search(text)
    if match is None:
        return None
    kind = next((k for k in KINDS if k.__name__ == match.group(1)), CareFLError)
    return kind(match.group(2))


class RoundLog:
    """Recorder listener logging :func:`round_line` (a deployment's ServerApp has no console).

    Parameters
    ----------
    total_rounds : int
        Rounds planned.
    """

    def __init__(self, total_rounds: int) -> None:
        self.total_rounds = total_rounds

    def __call__(self, server_round: int, rows: list[SiteRoundMetrics]) -> None:
        """Log the finished round."""
        log(INFO, "%s", round_line(server_round, self.total_rounds, rows))


def _cell(row: SiteRoundMetrics) -> str:
    """A site's cell of the live table: accuracy / AUC, then sensitivity / specificity at 0.5."""
    return f"{_fmt(row.accuracy)} / {_fmt(row.auc)}\n{_fmt(row.sensitivity)} / {_fmt(row.specificity)}"


class RoundTable:
    """Rich live table: one row per global model evaluated (the model after round r; 0: the initial model).

    Each row holds accuracy, AUC, sensitivity and specificity per site plus the weighted mean, and
    the most epsilon a site had spent to produce that model.

    On a console that is not a terminal (a log file, CI) each round is printed as one line
    instead, and the whole table once at the end.

    Parameters
    ----------
    title : str
        Table title.
    total_rounds : int
        Rounds planned (shown in the caption).
    console : Console, optional
        Where to draw.
    """

    def __init__(self, title: str, total_rounds: int, console: Console | None = None) -> None:
        self.title = title
        self.total_rounds = total_rounds
        self._rounds: list[tuple[int, list[SiteRoundMetrics]]] = []
        self._console = console or Console()
        self._live: Live | None = None
        if self._console.is_terminal:
            self._live = Live(self._render(), console=self._console, refresh_per_second=4)

    def __enter__(self) -> RoundTable:
        if self._live is not None:
            self._live.__enter__()
        else:
            self._console.print(f"{self.title}: {self.total_rounds} rounds")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)  # type: ignore[arg-type]
        elif self._rounds:
            self._console.print(self._render())

    def __call__(self, server_round: int, rows: list[SiteRoundMetrics]) -> None:
        """Add the evaluation of the model after ``server_round`` (a :class:`~server.recorder.FederationRecorder` listener)."""
        self._rounds.append((server_round, rows))
        if self._live is not None:
            self._live.update(self._render())
            return
        self._console.print(f"  {round_line(server_round, self.total_rounds, rows)}", highlight=False)

    def _sites(self) -> Sequence[str]:
        return sorted({r.site for _, rows in self._rounds for r in rows})

    def _render(self) -> Table:
        done = max((r for r, _ in self._rounds), default=0)
        caption = f"model after round {done} of {self.total_rounds}" + ("; 0: the initial model" if self._initial() else "")
        table = Table(title=self.title, caption=caption)
        table.add_column("model after\nround", justify="right")
        for site in self._sites():
            table.add_column(f"{site}\nacc / AUC\nsens / spec", justify="right")
        table.add_column("weighted mean\nacc / AUC\nsens / spec", justify="right", style="bold")
        table.add_column("max epsilon\nspent", justify="right")
        for server_round, rows in self._rounds:
            by_site = {r.site: r for r in rows}
            cells = [_cell(by_site[s]) if s in by_site else "-" for s in self._sites()]
            mean = (
                f"{_fmt(weighted_mean(rows, 'accuracy'))} / {_fmt(weighted_mean(rows, 'auc'))}\n"
                f"{_fmt(weighted_mean(rows, 'sensitivity'))} / {_fmt(weighted_mean(rows, 'specificity'))}"
            )
            table.add_row(str(server_round), *cells, mean, _fmt(_max_epsilon(rows)))
        return table

    def _initial(self) -> bool:
        return any(r == 0 for r, _ in self._rounds)
