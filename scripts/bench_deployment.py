"""Benchmark: wall time per round as real Flower processes vs on the simulation engine.

Runs the same federation twice (heart-disease or, with ``--task chest-xray``, MobileNetV2 + head;
3 hospitals, DP, SecAgg+ unless ``--no-secagg``):

1. on Flower's simulation engine (``server.local.simulation.simulate``), timing each round's end;
2. as ``carefl demo --deployment`` (TLS SuperLink, 3 SuperNodes, ``flwr run``), timestamping
   every line of the ServerApp's log and of each SuperNode's log as it appears (polled every
   0.1 s), then splitting each round into its messages: per stage, the SuperNodes' wait before
   the message arrived (SuperLink polling 3 s, SuperNode polling 3 s, the server's own work) and
   the ClientApp's time (a thin process per message, and the site worker's work).

By default (``evaluate-in-fit``) a site evaluates the model it receives in the fit message, and only
the final model gets an evaluate message: rounds 1..R-1 have no evaluate stage, round R has one.
The ServerApp logs the figures of the model after round ``r - 1`` when round ``r``'s training ends,
so that line ends round ``r``; round R ends with the final model's line. ``--evaluate-separately``
runs the old pattern (an evaluate message after every round; each round ends with its own line).

Usage::

    .venv/bin/python scripts/bench_deployment.py --rounds 3 [--task chest-xray] [--compare-per-message]
        [--no-secagg] [--evaluate-separately] [--json out.json]

Training and evaluation run in each hospital's long-lived site worker (:mod:`client.worker`);
``--compare-per-message`` deploys once more without it, each message training in a fresh
process as plain Flower does, and prints the speed-up.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from client.policy import SitePolicy
from server.local.demo import demo_config, ensure_backbone
from server.local.deployment import DeploymentDemoOptions, run_local_deployment
from server.local.simulation import simulate
from server.recorder import FederationRecorder
from shared.config import RunConfig
from shared.processes import read_new_lines

SECAGG_STAGES = ("SecAgg+ setup", "SecAgg+ share keys", "train + mask (fit)", "SecAgg+ unmask", "evaluate")
PLAIN_STAGES = ("train (fit)", "evaluate")
IN_FIT_SECAGG_STAGES = (
    "SecAgg+ setup", "SecAgg+ share keys", "evaluate received + train + mask (fit)", "SecAgg+ unmask",
    "evaluate (final model)",
)  # fmt: skip
IN_FIT_PLAIN_STAGES = ("evaluate received + train (fit)", "evaluate (final model)")
_ROUND_END = re.compile(r"carefl: round (\d+)/\d+(?: \(initial model\))?:")
_NODE_ROUND = re.compile(r"\[RUN \d+(?:, ROUND (\d+))?\]")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class LogTail:
    """Timestamps every new line of the ``*.log`` files in a folder (a background thread)."""

    def __init__(self, folder: Path, poll: float = 0.1) -> None:
        self.folder = folder
        self.poll = poll
        self.lines: dict[str, list[tuple[float, str]]] = defaultdict(list)
        self._offsets: dict[Path, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LogTail:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._scan()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._scan()
            time.sleep(self.poll)

    def _scan(self) -> None:
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("*.log")):
            lines, self._offsets[path] = read_new_lines(path, self._offsets.get(path, 0))
            now = time.monotonic()
            self.lines[path.stem].extend((now, _ANSI.sub("", line)) for line in lines)


@dataclass
class Message:
    """One message as a SuperNode saw it."""

    kind: str
    round: int
    received: float
    sent: float = float("nan")
    charged: float = float("nan")


def node_messages(lines: list[tuple[float, str]]) -> list[Message]:
    """Parse a SuperNode log into its messages (receive, ledger charge, send)."""
    messages: list[Message] = []
    current_round, kind = 0, ""
    for t, line in lines:
        if match := _NODE_ROUND.search(line):
            current_round = int(match.group(1) or 0)
        elif "Receiving:" in line:
            kind = line.split("Receiving:")[1].split(" message")[0].strip()
        elif "Received successfully" in line:
            messages.append(Message(kind, current_round, t))
        elif "charged to the ledger" in line and messages:
            messages[-1].charged = t
        elif "Sent successfully" in line and messages:
            messages[-1].sent = t
    return messages


def ended_round(measured: int, cfg: RunConfig) -> int:
    """The round whose end the figures of the model after round ``measured`` mark.

    With ``evaluate-in-fit`` they arrive with round ``measured + 1``'s training (the final model's with
    round R's evaluate); otherwise with round ``measured``'s evaluate.
    """
    if not cfg.server.evaluate_in_fit:
        return measured
    return min(measured + 1, cfg.study.num_rounds)


def stage_names(cfg: RunConfig, server_round: int) -> tuple[str, ...]:
    """The messages of round ``server_round``, in order, as a SuperNode receives them."""
    if not cfg.server.evaluate_in_fit:
        return SECAGG_STAGES if cfg.study.secure_aggregation else PLAIN_STAGES
    names = IN_FIT_SECAGG_STAGES if cfg.study.secure_aggregation else IN_FIT_PLAIN_STAGES
    return names if server_round == cfg.study.num_rounds else names[:-1]


def _mark(ends: dict[int, float], server_round: int, t: float) -> None:
    """Keep the latest time seen for the end of ``server_round``."""
    ends[server_round] = max(t, ends.get(server_round, t))


def simulation_rounds(cfg: RunConfig, root: Path) -> tuple[dict[int, float], float]:
    """Per-round wall seconds on the simulation engine (round 1 counted from the call)."""
    ends: dict[int, float] = {}
    recorder = FederationRecorder(listeners=[lambda r, _rows: _mark(ends, ended_round(r, cfg), time.monotonic())])
    start = time.monotonic()
    simulate(cfg, num_sites=3, sites_root=root / "sim-sites", recorder=recorder, policy=SitePolicy(require_dp=cfg.study.dp))
    total = time.monotonic() - start
    return _durations(ends, start), total


def deployment_rounds(cfg: RunConfig, root: Path, *, site_worker: bool = True) -> dict[str, Any]:
    """Run the deployment demo; per-round wall seconds and the per-stage breakdown."""
    server: list[tuple[float, str]] = []
    work = root / "work"
    start = time.monotonic()
    with LogTail(work / "logs") as tail:
        run_local_deployment(
            DeploymentDemoOptions(cfg, root / "run", work, site_worker=site_worker), Console(file=io.StringIO()),
            on_line=lambda t, line: server.append((t, line)),
        )  # fmt: skip
    total = time.monotonic() - start
    ends: dict[int, float] = {}
    for t, line in server:
        if m := _ROUND_END.search(line):
            _mark(ends, ended_round(int(m.group(1)), cfg), t)
    submitted = min(t for t, _ in server) if server else start
    nodes = {name: node_messages(lines) for name, lines in tail.lines.items() if name.startswith("supernode-")}
    return {
        "total_s": total,
        "before_first_log_line_s": submitted - start,
        "rounds": _durations(ends, submitted),
        "stages": _stages(nodes, cfg),
    }


def _durations(ends: dict[int, float], start: float) -> dict[int, float]:
    out, previous = {}, start
    for rnd in sorted(ends):
        out[rnd], previous = ends[rnd] - previous, ends[rnd]
    return out


def _stages(nodes: dict[str, list[Message]], cfg: RunConfig) -> list[dict[str, Any]]:
    """Per (round, stage): mean over nodes of the wait before the message and the ClientApp time."""
    rows: dict[tuple[int, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for messages in nodes.values():
        previous_sent: float | None = None
        position: dict[int, int] = defaultdict(int)
        for msg in messages:
            if msg.round == 0:
                stage = "backbone offer/transfer"
            else:
                names = stage_names(cfg, msg.round)
                stage = names[min(position[msg.round], len(names) - 1)]
                position[msg.round] += 1
            key = (msg.round, stage)
            if previous_sent is not None:
                rows[key]["wait"].append(msg.received - previous_sent)
            rows[key]["clientapp"].append(msg.sent - msg.received)
            if msg.charged == msg.charged:  # not NaN: a DP training message
                rows[key]["startup_to_charge"].append(msg.charged - msg.received)
                rows[key]["training"].append(msg.sent - msg.charged)
            previous_sent = msg.sent
    return [
        {"round": rnd, "stage": stage, **{k: statistics.fmean(v) for k, v in values.items()}}
        for (rnd, stage), values in rows.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-secagg", action="store_true")
    parser.add_argument(
        "--evaluate-separately", action="store_true", help="an evaluate message after every round (evaluate-in-fit off)"
    )
    parser.add_argument("--registry", type=Path, default=Path(".carefl/registry"))
    parser.add_argument("--task", choices=("heart-disease", "chest-xray"), default="heart-disease")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/pneumoniamnist.npz"), help="chest-xray's data")
    parser.add_argument(
        "--compare-per-message", action="store_true",
        help="also deploy without the site worker (a fresh training process per message, as plain Flower)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    console = Console()
    chest = {"data_path": str(args.data.resolve()), "num_sites": 3} if args.task == "chest-xray" else {}
    cfg = demo_config(
        args.task, num_rounds=args.rounds, local_epochs=1, registry_dir=str(args.registry.resolve()),
        secure_aggregation=not args.no_secagg, evaluate_in_fit=not args.evaluate_separately, **chest,
    )  # fmt: skip
    ensure_backbone(cfg, console)
    root = Path(tempfile.mkdtemp(prefix="carefl-bench-deploy-"))
    pattern = "an evaluate message per round" if args.evaluate_separately else "evaluation in the fit message"
    console.print(
        f"{args.task}: simulation ({args.rounds} rounds, DP, SecAgg+ {'off' if args.no_secagg else 'on'}, {pattern})..."
    )
    sim, sim_total = simulation_rounds(cfg, root / "sim")
    console.print("Deployment (TLS SuperLink, 3 SuperNodes, flwr run), training in each site's worker...")
    dep = deployment_rounds(cfg, root / "worker")
    per_message = None
    if args.compare_per_message:
        console.print("Deployment again, a fresh training process per message (no site worker)...")
        per_message = deployment_rounds(cfg, root / "per-message", site_worker=False)

    table = Table(title=f"{args.task}: wall time per round (s), and deployment / simulation")
    columns = ["round", "simulation", "deployment", "ratio"]
    if per_message is not None:
        columns += ["per-message deployment", "ratio", "worker speed-up"]
    for column in columns:
        table.add_column(column, justify="right")
    for rnd in sorted(sim):
        worker = dep["rounds"].get(rnd, float("nan"))
        cells = [str(rnd), f"{sim[rnd]:.1f}", f"{worker:.1f}", f"{worker / sim[rnd]:.1f}x"]
        if per_message is not None:
            plain = per_message["rounds"].get(rnd, float("nan"))
            cells += [f"{plain:.1f}", f"{plain / sim[rnd]:.1f}x", f"{plain / worker:.1f}x"]
        table.add_row(*cells)
    totals = ["total", f"{sim_total:.1f}", f"{dep['total_s']:.1f}", ""]
    if per_message is not None:
        totals += [f"{per_message['total_s']:.1f}", "", f"{per_message['total_s'] / dep['total_s']:.1f}x"]
    table.add_row(*totals)
    console.print(table)
    console.print(
        f"Deployment start-up (SuperLink, registration, SuperNodes, flwr run) until the first ServerApp line: "
        f"{dep['before_first_log_line_s']:.1f} s; round 1 includes the backbone offer/transfer."
    )
    stages = Table(title="Deployment: where a round's time goes (mean over the 3 SuperNodes, s)")
    for column in ("round", "stage", "wait before (polling, server)", "ClientApp process", "of which DP training"):
        stages.add_column(column, justify="right" if column != "stage" else "left")
    for row in dep["stages"]:
        stages.add_row(
            str(row["round"]), row["stage"], f"{row.get('wait', float('nan')):.1f}", f"{row['clientapp']:.1f}",
            f"{row['training']:.1f}" if "training" in row else "-",
        )  # fmt: skip
    console.print(stages)
    if args.json:
        out = {"task": args.task, "simulation": {"rounds": sim, "total_s": sim_total}, "deployment": dep}
        args.json.write_text(json.dumps({**out, "per_message_deployment": per_message}, indent=2))


if __name__ == "__main__":
    main()
