"""The site worker: one long-lived process trains for the node's thin task processes.

Real worker processes on a real heart-disease site; messages as Flower builds them. Checked:
the task side imports no torch; training through the worker equals training in process; the
channel refuses a socket of the wrong mode and a wrong secret; a killed worker loses neither a
ledger charge nor an audit entry, and the next message starts a new one; a site's refusal
comes back as the site's refusal; a worker stops with its runtime.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import (
    evaluateins_to_recorddict,
    fitins_to_recorddict,
    recorddict_to_evaluateres,
    recorddict_to_fitres,
)
from flwr.supercore.task_identity import TaskIdentity

from client.app import create_client_app, create_worker_app
from client.audit import AUDIT_FILE
from client.ledger import PrivacyLedger
from client.policy import SitePolicy
from client.setup import prepare_site_dir
from client.worker.channel import ChannelError, connect, recv_frame, send_frames, socket_path, worker_dir
from client.worker.link import WorkerLink
from client.worker.process import PID_FILE
from client.worker.wire import KIND_PING, STATUS_DENIED, STATUS_OK
from server.app import site_config
from shared import protocol as wire
from shared.config import RunConfig
from shared.params import exchanged_names, get_arrays
from shared.pipeline import build_model, effective_trainable


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Messages need the identity of the running task; Flower's runtimes set it the same way.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real heart-disease hospital (Hungary's partition) whose policy allows runs without DP."""
    site_dir = tmp_path_factory.mktemp("worker") / "site"
    prepare_site_dir(site_dir, site="Hungary", policy=SitePolicy(require_dp=False))
    yield site_dir
    _stop_worker(site_dir)


def _stop_worker(site_dir: Path) -> None:
    pid_file = worker_dir(site_dir) / PID_FILE
    if pid_file.is_file():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _worker_pid(site_dir: Path) -> int:
    return int((worker_dir(site_dir) / PID_FILE).read_text())


def _context(site_dir: Path) -> Context:
    node = {"site-dir": str(site_dir), "partition-id": 0, "num-partitions": 3}
    return Context(run_id=7, node_id=0, node_config=node, state=RecordDict(), run_config={})


def _study(*, dp: bool) -> tuple[RunConfig, list[np.ndarray]]:
    cfg = RunConfig.of(task="heart-disease", setup="scratch", num_rounds=2, secure_aggregation=False, dp=dp)
    model = build_model(cfg.study, None)
    return cfg, get_arrays(model, exchanged_names(model, effective_trainable(cfg.study)))


def _fit(cfg: RunConfig, params: list[np.ndarray], server_round: int) -> Message:
    ins = FitIns(ndarrays_to_parameters(params), {**site_config(cfg, None), wire.ROUND_KEY: server_round})
    return Message(fitins_to_recorddict(ins, keep_input=True), dst_node_id=0, message_type=MessageType.TRAIN)


def _evaluate(cfg: RunConfig, params: list[np.ndarray]) -> Message:
    ins = EvaluateIns(ndarrays_to_parameters(params), {**site_config(cfg, None), wire.ROUND_KEY: 1})
    return Message(
        evaluateins_to_recorddict(ins, keep_input=True), dst_node_id=0, message_type=MessageType.EVALUATE
    )


def test_training_in_the_worker_equals_training_in_process(site: Path) -> None:
    # Prepare: the same fit messages (no DP, fixed seeds) for both paths; round 2 in the
    # worker trains a copy of the model it kept from round 1
    cfg, params = _study(dp=False)
    worker_app, process_app = create_worker_app(parent_pid=os.getpid()), create_client_app()

    for server_round in (1, 2):
        # Execute
        in_worker = worker_app(_fit(cfg, params, server_round), _context(site))
        in_process = process_app(_fit(cfg, params, server_round), _context(site))

        # Assert: bit-identical update and the same metrics
        assert not in_worker.has_error() and not in_process.has_error()
        worker_res = recorddict_to_fitres(in_worker.content, keep_input=False)
        process_res = recorddict_to_fitres(in_process.content, keep_input=False)
        worker_arrays = parameters_to_ndarrays(worker_res.parameters)
        for a, b in zip(worker_arrays, parameters_to_ndarrays(process_res.parameters), strict=True):
            np.testing.assert_array_equal(a, b)
        assert worker_res.num_examples == process_res.num_examples > 0
        assert worker_res.metrics == process_res.metrics
        params = [p + d for p, d in zip(params, worker_arrays, strict=True)]  # the next round's global model
    assert _worker_pid(site) != os.getpid()


def test_task_side_answers_through_the_worker_without_importing_torch(site: Path, tmp_path: Path) -> None:
    # Prepare: an evaluate message's parameters and config, handed to a fresh interpreter as files
    cfg, params = _study(dp=False)
    np.savez(tmp_path / "params.npz", *params)
    (tmp_path / "config.json").write_text(json.dumps({**site_config(cfg, None), wire.ROUND_KEY: 1}))
    script = f"""
import json, os, sys
import numpy as np
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common import EvaluateIns, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import evaluateins_to_recorddict, recorddict_to_evaluateres
from flwr.supercore.task_identity import TaskIdentity
from client.app import create_worker_app
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
params = list(np.load({str(tmp_path / "params.npz")!r}).values())
config = json.loads(open({str(tmp_path / "config.json")!r}).read())
content = evaluateins_to_recorddict(EvaluateIns(ndarrays_to_parameters(params), config), keep_input=True)
node = {{"site-dir": {str(site)!r}, "partition-id": 0, "num-partitions": 3}}
context = Context(run_id=7, node_id=0, node_config=node, state=RecordDict(), run_config={{}})
reply = create_worker_app(parent_pid=os.getppid())(Message(content, dst_node_id=0, message_type=MessageType.EVALUATE), context)
res = recorddict_to_evaluateres(reply.content)
print(json.dumps({{"torch": "torch" in sys.modules, "n": res.num_examples, "auc": res.metrics["auc"]}}))
"""

    # Execute: the site runtime's app (mods here, training in the worker), in a fresh interpreter
    done = subprocess.run(
        [sys.executable, "-P", "-c", script], capture_output=True, text=True, timeout=240, check=False
    )

    # Assert: a real evaluation came back, and torch was never imported on this side
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torch"] is False
    expected = recorddict_to_evaluateres(create_client_app()(_evaluate(cfg, params), _context(site)).content)
    assert result["n"] == expected.num_examples > 0
    assert result["auc"] == pytest.approx(expected.metrics["auc"])


def test_a_socket_with_another_mode_is_never_connected_to(tmp_path: Path) -> None:
    # Prepare: a listening socket where the worker's would be, but readable by everyone
    path = socket_path(tmp_path)
    path.parent.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    os.chmod(path, 0o666)
    listener.settimeout(0.3)

    # Execute / Assert: refused before connecting, so nothing reached the listener
    with pytest.raises(ChannelError, match="mode 0666, not 0600"):
        connect(path, timeout=1.0)
    with pytest.raises(TimeoutError):
        listener.accept()
    listener.close()


def test_a_wrong_secret_is_refused_and_the_worker_keeps_serving(site: Path) -> None:
    # Prepare: a running worker
    WorkerLink(site, parent_pid=os.getpid()).ensure()
    secret = (worker_dir(site) / "worker.secret").read_bytes()
    wrong = bytes(b ^ 0xFF for b in secret)

    # Execute
    with connect(socket_path(site), timeout=10.0) as sock:
        send_frames(sock, wrong)
        denied = recv_frame(sock)
    with connect(socket_path(site), timeout=10.0) as sock:
        send_frames(sock, secret)
        accepted = recv_frame(sock)
        send_frames(sock, KIND_PING)
        served = recv_frame(sock)

    # Assert
    assert denied == STATUS_DENIED
    assert accepted == served == STATUS_OK


def test_a_killed_worker_loses_no_charge_and_the_next_message_starts_a_new_one(site: Path) -> None:
    # Prepare: a DP run whose round 1 the worker trains and charges
    cfg, params = _study(dp=True)
    app = create_worker_app(parent_pid=os.getpid())
    first = app(_fit(cfg, params, 1), _context(site))
    assert not first.has_error(), first.error if first.has_error() else ""
    killed = _worker_pid(site)

    # Execute: SIGKILL between two messages, then round 2
    os.kill(killed, signal.SIGKILL)
    time.sleep(0.2)
    second = app(_fit(cfg, params, 2), _context(site))

    # Assert: round 2 trained in a new worker; both charges are in the ledger, both replies audited
    assert not second.has_error(), second.error if second.has_error() else ""
    assert _worker_pid(site) != killed
    charged = [(e.run_id, e.round) for e in PrivacyLedger.open(site).entries() if e.run_id == "7"]
    assert charged == [("7", 1), ("7", 2)]
    audited = [json.loads(line) for line in (site / AUDIT_FILE).read_text().splitlines()]
    assert [r["round"] for r in audited if r["run_id"] == "7" and r["message_type"] == MessageType.TRAIN][
        -2:
    ] == [1, 2]


def test_a_sites_refusal_in_the_worker_comes_back_as_its_refusal(site: Path, tmp_path: Path) -> None:
    # Prepare: the site's node now points at a policy that requires DP; a run without DP
    strict = tmp_path / "strict.toml"
    strict.write_text(SitePolicy(require_dp=True).to_toml())
    context = _context(site)
    context.node_config["policy"] = str(strict)
    cfg, params = _study(dp=False)
    charges = len(PrivacyLedger.open(site).entries())

    # Execute
    reply = create_worker_app(parent_pid=os.getpid())(_fit(cfg, params, 1), context)

    # Assert: the site's error reply, with the rule named, and nothing charged
    assert reply.has_error() and reply.error.code == wire.SITE_REFUSED
    assert "require_dp" in reply.error.reason
    assert len(PrivacyLedger.open(site).entries()) == charges


def test_the_worker_stops_with_its_runtime(tmp_path: Path) -> None:
    # Prepare: a stand-in for the site runtime, and its worker
    site_dir = tmp_path / "site"
    prepare_site_dir(site_dir, site="Hungary", policy=SitePolicy())
    runtime = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    started: list[subprocess.Popen[bytes]] = []
    WorkerLink(
        site_dir,
        parent_pid=runtime.pid,
        launch=lambda argv: started.append(subprocess.Popen(argv)) or started[-1],
    ).ensure()

    # Execute
    runtime.kill()
    runtime.wait()

    # Assert: gone within seconds, of its own accord, its socket and secret removed
    assert started[0].wait(timeout=15) == 0
    assert not socket_path(site_dir).exists() and not (worker_dir(site_dir) / "worker.secret").exists()
