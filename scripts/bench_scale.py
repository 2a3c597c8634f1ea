"""Scale benchmark (issue 12 §4): chest-xray in simulation with many sites, plain and SecAgg+.

For each number of sites (a Dirichlet split of PneumoniaMNIST's training images, ``--alpha``)
and each aggregation (plain FedAvg, SecAgg+), one run on Flower's simulation engine measures

- seconds per round: mean over rounds 2..R between the ends of rounds (start-up and the
  backbone's distribution in round 1 are not counted; with ``--rounds 1`` the whole run);
- CPU seconds per round, over the same rounds, of this process and all its children: on a
  machine shared with other work this is the steadier measure of what a round costs;
- peak memory: the largest sum of RSS over this process and all its children (Ray's GCS,
  raylet and workers), sampled every 0.2 s in a background thread. Shared pages (Ray's object
  store, torch's libraries) count once per process, so this overstates what is really used;
- bytes per site per round, sent and received: the serialized size (Flower's protobuf
  ``RecordDict``) of every message a site receives and every reply it sends, SecAgg+'s four
  stages and the evaluation included, measured by a client mod at each site, summed over a
  round and averaged over the sites.

The per-site training is kept cheap so the benchmark measures the federation, not the
learning: frozen MobileNetV2 with a trainable head on cached features, 32-pixel images, one
local epoch, batch 16, no DP (DP changes nothing in what the federation sends).

``--crypto`` instead measures, on one core and without a federation, the CPU seconds SecAgg+'s
cryptography costs per round (:func:`secagg_crypto_seconds`), with Flower's secret sharing and
with :mod:`shared.shamir`'s.

What limits the scale (measured with ``--alpha 2``: the default ``dirichlet-alpha`` 1.0 cannot
give each of 100 sites its 10 training images of PneumoniaMNIST's 4,708, and the split refuses):

- with Flower's own Shamir sharing (pure-Python GF(2^128), 16-byte chunks), a site spends
  ~4.3 s per round at 100 sites splitting its seed and its 306-byte PEM key, so the share-keys
  stage needs ~215 s on 2 cores and outlasts the default ``stage-timeout`` of 120 s: the round
  fails. :mod:`shared.shamir` makes that 17 ms;
- what remains grows linearly with the sites: every message rebuilds the site's model, reads
  and verifies the 14 MB backbone and re-splits the data set (~60% of the samples at 100 sites),
  and SecAgg+ sends 4 messages per round instead of 1; its key agreements (ECDH on P-384, 2 per
  pair of sites) are 14 CPU-s per round at 100 sites, the bytes a site receives grow with the
  sites (the other sites' keys and encrypted shares), memory does not (2 Ray workers).

Usage::

    nice -n 10 .venv/bin/python scripts/bench_scale.py --data ../shared/data/pneumoniamnist.npz \\
        --sites 4,16,64,100 --rounds 2 --alpha 2 --json scale.json
    nice -n 10 .venv/bin/python scripts/bench_scale.py --data - --crypto --sites 4,10,16,64,100
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from client.policy import SitePolicy
from server.local.demo import demo_config, ensure_backbone
from server.local.simulation import simulate
from server.recorder import FederationRecorder
from shared.config import RunConfig

NO_DP = SitePolicy(require_dp=False)
SAMPLE_SECONDS = 0.2
FLOWER_CRYPTO_MAX_SITES = 32  # --crypto: Flower's pure-Python GF(2^128) sharing takes minutes a round beyond


class PeakRss:
    """Largest total RSS of this process and its descendants, sampled in a background thread."""

    def __init__(self, interval: float = SAMPLE_SECONDS) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> int:
        """Return the current total RSS in bytes (processes that end meanwhile are skipped)."""
        return _tree_sum(lambda proc: proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)


def _tree_sum(measure: Callable[[psutil.Process], float]) -> float:
    """Sum ``measure`` over this process and its descendants (those that end meanwhile are skipped)."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += measure(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and its descendants."""
    return _tree_sum(lambda proc: sum(proc.cpu_times()[:2]))


def byte_counter(out: Path) -> Callable[..., Any]:
    """A client mod appending, per message, ``site round stage received sent`` to ``out/s<site>.tsv``.

    Self-contained (imports inside): Ray ships it to its workers by value.
    """

    def mod(message: Any, context: Any, call_next: Any) -> Any:
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
        from flwr.common.serde import recorddict_to_proto

        def size(msg: Any) -> int:
            return recorddict_to_proto(msg.content).ByteSize() if msg.has_content() else 0

        stage = str(message.metadata.message_type)
        if message.has_content() and RECORD_KEY_CONFIGS in message.content.config_records:
            stage = str(message.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        received = size(message)
        reply = call_next(message, context)
        site = int(context.node_config["partition-id"])
        line = f"{site}\t{message.metadata.group_id}\t{stage}\t{received}\t{size(reply)}\n"
        with open(out / f"s{site}.tsv", "a", encoding="utf-8") as handle:
            handle.write(line)
        return reply

    return mod


def bytes_per_site(folder: Path, rounds: Sequence[int]) -> dict[str, Any]:
    """Mean bytes a site received and sent per round in ``rounds``, in total and per stage."""
    received: dict[str, int] = defaultdict(int)
    sent: dict[str, int] = defaultdict(int)
    sites = set()
    for path in folder.glob("s*.tsv"):
        for row in path.read_text(encoding="utf-8").splitlines():
            site, group, stage, got, gave = row.split("\t")
            if group.isdigit() and int(group) in rounds:
                sites.add(site)
                received[stage] += int(got)
                sent[stage] += int(gave)
    per = max(1, len(sites) * len(rounds))
    return {
        "received": sum(received.values()) / per,
        "sent": sum(sent.values()) / per,
        "stages": {s: {"received": received[s] / per, "sent": sent[s] / per} for s in sorted(received)},
    }


def secagg_crypto_seconds(sites: int, *, carefl_shares: bool, values: int = 2 * 1280 + 2) -> dict[str, float]:
    """CPU seconds one SecAgg+ round spends in cryptography at ``sites`` sites, all on one core.

    Calls, as often as Flower's SecAgg+ stages do, the primitives they call: per site two key
    pairs, Shamir shares of its mask seed and first private key, a shared key (ECDH + HKDF) and
    a Fernet encryption per other site, the decryptions, a shared key and a mask per other site
    and its own mask; at the server, one secret rebuilt and one mask expanded per site (no
    drop-outs). ``carefl_shares`` picks :mod:`shared.shamir` or Flower's own secret sharing.
    """
    from flwr.common.secure_aggregation.crypto import shamir as flower_shamir
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
        decrypt,
        encrypt,
        generate_shared_key,
    )
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_private_key,
        bytes_to_public_key,
        generate_key_pairs,
        private_key_to_bytes,
        public_key_to_bytes,
    )

    from shared import shamir
    from shared.masks import expand_masks

    share = shamir if carefl_shares else flower_shamir
    threshold = max(2, -(-2 * sites // 3))
    shapes = [(values,)]
    cost: dict[str, float] = defaultdict(float)

    def timed(part: str, call: Callable[[], Any]) -> Any:
        begin = time.process_time()
        out = call()
        cost[part] += time.process_time() - begin
        return out

    keys = [timed("key pairs", lambda: (generate_key_pairs(), generate_key_pairs())) for _ in range(sites)]
    sk1, pk1 = private_key_to_bytes(keys[0][0][0]), public_key_to_bytes(keys[1][0][1])
    sk2, pk2 = private_key_to_bytes(keys[0][1][0]), public_key_to_bytes(keys[1][1][1])
    b_shares: list[bytes] = []
    for _ in range(sites):  # share keys
        b_shares = timed("Shamir split", lambda: share.create_shares(os.urandom(32), threshold, sites))
        sk_shares = timed("Shamir split", lambda: share.create_shares(sk1, threshold, sites))
        plaintext = bytes(20) + b_shares[0] + sk_shares[0]  # source, destination, length, the two shares
        for _ in range(sites - 1):
            key = timed(
                "ECDH + HKDF",
                lambda: generate_shared_key(bytes_to_private_key(sk2), bytes_to_public_key(pk2)),
            )
            token = timed("Fernet", lambda key=key, text=plaintext: encrypt(key, text))
            timed("Fernet", lambda key=key, token=token: decrypt(key, token))
    for _ in range(sites):  # collect masked vectors
        timed("masks", lambda: expand_masks(os.urandom(32), 1 << 32, shapes))
        for _ in range(sites - 1):
            key = timed(
                "ECDH + HKDF",
                lambda: generate_shared_key(bytes_to_private_key(sk1), bytes_to_public_key(pk1)),
            )
            timed("masks", lambda key=key: expand_masks(key, 1 << 32, shapes))
    for _ in range(sites):  # unmask, at the server
        seed = timed("Shamir combine", lambda: share.combine_shares(b_shares[:threshold]))
        timed("masks", lambda seed=seed: expand_masks(seed, 1 << 32, shapes))
    return {"total": sum(cost.values()), **cost}


def scale_config(
    data: Path,
    sites: int,
    *,
    rounds: int,
    secure: bool,
    alpha: float,
    registry: Path,
    stage_timeout: float | None,
) -> RunConfig:
    """The benchmark's run: chest-xray, head on frozen MobileNetV2, cheap local training, no DP."""
    return demo_config(
        "chest-xray", data_path=str(data), num_sites=sites, num_rounds=rounds, dp=False,
        secure_aggregation=secure, dirichlet_alpha=alpha, image_size=32, local_epochs=1, batch_size=16,
        registry_dir=str(registry), stage_timeout=stage_timeout,
    )  # fmt: skip


def run_scale(
    data: Path,
    sites: int,
    *,
    rounds: int,
    secure: bool,
    state_dir: Path,
    alpha: float = 1.0,
    stage_timeout: float | None = None,
) -> dict[str, Any]:
    """Run one federation of ``sites`` sites and return its figures.

    Parameters
    ----------
    data : Path
        PneumoniaMNIST ``.npz`` (or an image folder).
    sites : int
        Number of simulated hospitals.
    rounds : int
        Rounds to run; the time per round is taken over rounds 2..``rounds`` (all of the run if 1).
    secure : bool
        SecAgg+ (True) or plain FedAvg.
    state_dir : Path
        Backbone registry and the sites' directories (their feature caches are reused).
    alpha : float
        Dirichlet concentration of the split.
    stage_timeout : float, optional
        ``stage-timeout`` (seconds per SecAgg+ stage); the run config's default if ``None``.

    Returns
    -------
    dict
        ``sites``, ``secure``, ``rounds``, ``s_per_round``, ``peak_rss_bytes``, ``received`` and
        ``sent`` (bytes per site per round), ``stages`` (the same per message kind), ``auc``.
    """
    cfg = scale_config(
        data, sites, rounds=rounds, secure=secure, alpha=alpha, registry=state_dir / "registry",
        stage_timeout=stage_timeout,
    )  # fmt: skip
    ensure_backbone(cfg, Console(quiet=True))
    counted = state_dir / "bench-scale" / f"bytes-{sites}-{'secure' if secure else 'plain'}"
    shutil.rmtree(counted, ignore_errors=True)
    counted.mkdir(parents=True)
    ends: list[tuple[float, float]] = []
    recorder = FederationRecorder(
        listeners=[lambda _r, _rows: ends.append((time.perf_counter(), tree_cpu_seconds()))]
    )
    start = (time.perf_counter(), tree_cpu_seconds())
    with PeakRss() as memory:
        result = simulate(
            cfg, num_sites=sites, sites_root=state_dir / "bench-scale" / f"{sites}-sites", recorder=recorder,
            policy=NO_DP, client_mods=[byte_counter(counted)],
        )  # fmt: skip
    first, last = (ends[0], ends[-1]) if len(ends) > 1 else (start, ends[-1])
    timed_rounds = max(1, len(ends) - 1)
    timed = list(range(2, rounds + 1)) or [1]
    return {
        "sites": sites,
        "secure": secure,
        "rounds": rounds,
        "s_per_round": (last[0] - first[0]) / timed_rounds,
        "cpu_s_per_round": (last[1] - first[1]) / timed_rounds,
        "peak_rss_bytes": memory.peak,
        **bytes_per_site(counted, timed),
        "auc": result.final_summary()["auc"],
    }


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="PneumoniaMNIST .npz (or image folder)")
    parser.add_argument("--sites", default="4,16,64,100", help="comma-separated numbers of sites")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration of the split")
    parser.add_argument(
        "--stage-timeout",
        type=float,
        default=None,
        help="seconds per SecAgg+ stage (default: the run config's)",
    )
    parser.add_argument(
        "--state-dir", type=Path, default=Path(".carefl"), help="backbone registry and site caches"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--no-secagg", action="store_true", help="plain FedAvg only")
    which.add_argument("--secagg-only", action="store_true", help="SecAgg+ only")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    parser.add_argument(
        "--crypto",
        action="store_true",
        help="only the CPU seconds of SecAgg+'s cryptography per round (no federation)",
    )
    args = parser.parse_args()
    console = Console()
    if args.crypto:
        crypto_table(console, [int(s) for s in args.sites.split(",")], args.json)
        return
    modes = [False] if args.no_secagg else [True] if args.secagg_only else [False, True]
    rows: list[dict[str, Any]] = []
    for count in (int(s) for s in args.sites.split(",")):
        for secure in modes:
            console.print(
                f"{count} sites, {'SecAgg+' if secure else 'plain'}: {args.rounds} rounds (pid {os.getpid()})..."
            )
            try:
                row = run_scale(
                    args.data, count, rounds=args.rounds, secure=secure, state_dir=args.state_dir, alpha=args.alpha,
                    stage_timeout=args.stage_timeout,
                )  # fmt: skip
            except Exception as error:  # noqa: BLE001 - a benchmark reports what broke and goes on
                row = {"sites": count, "secure": secure, "error": f"{type(error).__name__}: {error}"}
                console.print(f"  failed: {row['error']}")
            else:
                console.print(
                    f"  {row['s_per_round']:.2f} s/round, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB"
                )
            rows.append(row)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2))

    console.print(summary_table(rows, args.rounds))


def crypto_table(console: Console, counts: Sequence[int], out: Path | None) -> None:
    """Print (and write) :func:`secagg_crypto_seconds` with Flower's and CareFL's secret sharing."""
    rows = [
        {"sites": n, "shares": name, **secagg_crypto_seconds(n, carefl_shares=mine)}
        for n in counts
        for name, mine in (("Flower (GF(2^128))", False), ("CareFL (GF(2^521-1))", True))
        if mine or n <= FLOWER_CRYPTO_MAX_SITES
    ]
    parts = [k for k in rows[0] if k not in ("sites", "shares", "total")]
    title = "bench_scale --crypto: CPU seconds of SecAgg+'s cryptography per round, one core"
    table = Table(
        title=f"{title} (Flower's secret sharing up to {FLOWER_CRYPTO_MAX_SITES} sites: minutes beyond)"
    )
    for column in ("sites", "secret sharing", "total", *parts):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["sites"]), r["shares"], f"{r['total']:.3f}", *[f"{r[k]:.3f}" for k in parts])
    console.print(table)
    if out:
        out.write_text(json.dumps(rows, indent=2))


def summary_table(rows: Sequence[dict[str, Any]], rounds: int) -> Table:
    """The benchmark's table: one row per run, SecAgg+ rows with their ratio to plain."""
    table = Table(title=f"bench_scale: chest-xray, head only, 1 local epoch, rounds 2-{rounds}, no DP")
    columns = (
        "sites",
        "agg.",
        "s/round",
        "x",
        "CPU s/round",
        "x",
        "peak RSS GiB",
        "B recv/site/rnd",
        "B sent/site/rnd",
    )
    for column in columns:
        table.add_column(column, justify="right")
    plain = {r["sites"]: r for r in rows if not r["secure"] and "error" not in r}
    for r in rows:
        name = "SecAgg+" if r["secure"] else "plain"
        if "error" in r:
            table.add_row(str(r["sites"]), name, r["error"][:80], *[""] * 6)
            continue
        base = plain.get(r["sites"]) if r["secure"] else None
        wall = f"{r['s_per_round'] / base['s_per_round']:.2f}x" if base else ""
        cpu = f"{r['cpu_s_per_round'] / base['cpu_s_per_round']:.2f}x" if base else ""
        table.add_row(
            str(r["sites"]), name, f"{r['s_per_round']:.2f}", wall, f"{r['cpu_s_per_round']:.2f}", cpu,
            f"{r['peak_rss_bytes'] / 2**30:.2f}", f"{r['received']:,.0f}", f"{r['sent']:,.0f}",
        )  # fmt: skip
    return table


if __name__ == "__main__":
    main()
