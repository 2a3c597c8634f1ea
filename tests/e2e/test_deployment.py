"""Real Flower deployments on 127.0.0.1: a TLS SuperLink with node authentication, SuperNodes,
``flwr run``; refusals of unregistered and unencrypted nodes; a server crash and its resume.

Every test gets a :class:`ProcessGroups` whose process groups (and the tagged descendants in
groups of their own) must all be gone after the test, whether it passed or failed. Rounds cost
tens of seconds here (SuperNodes poll every 3 s and start a ClientApp process per message), so
the federations are the heart-disease task with 2 rounds of 1 local epoch.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console

from client.audit import ACCEPTED, AUDIT_FILE
from client.ledger import PrivacyLedger
from client.node import NodeCredentials, NodeOptions
from client.service import serve_node, start_supernode
from client.setup import prepare_site_dir
from client.worker.channel import worker_dir
from client.worker.process import PID_FILE
from server.checkpoint import load_checkpoint
from server.deployment import register_nodes, start_superlink
from server.local.demo import demo_config
from server.local.deployment import DeploymentDemoOptions, LocalDeployment
from server.provision import ConsortiumLayout, provision
from server.superlink import SuperLinkOptions, SuperLinkTLS
from shared.errors import EXIT_TERMINATED, DeploymentError
from shared.executables import executable, flower_env
from shared.processes import ProcessGroups, free_port, group_alive
from shared.tasks import OwnData, heart, load_own

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="process tracking is checked on Linux only"
    ),
]



@pytest.fixture()
def consortium(tmp_path: Path) -> ConsortiumLayout:
    """Two hospitals: ``hungary`` (to be registered) and ``intruder`` (never registered)."""
    return provision(tmp_path / "consortium", ["hungary", "intruder"])


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=200), buffer


def _tls_superlink(procs: ProcessGroups, layout: ConsortiumLayout, tmp_path: Path):  # type: ignore[no-untyped-def]
    options = SuperLinkOptions(
        tls=SuperLinkTLS.from_consortium(layout), database=tmp_path / "state.db", port=free_port()
    )
    link = start_superlink(
        procs, options, home=tmp_path / "link-home", cli_home=tmp_path / "cli-home", announce=print
    )
    return options, link


def _node(
    layout: ConsortiumLayout, name: str, address: str, tmp_path: Path, *, tls: bool = True
) -> NodeOptions:
    return NodeOptions(
        superlink=address,
        site_dir=tmp_path / "sites" / name,
        partition=(0, 3),
        credentials=NodeCredentials.from_dir(layout.hospital_dir(name)) if tls else None,
        port=free_port(),
        max_wait_time=8,
    )


def _own_csvs(folder: Path) -> dict[str, str]:
    """Three hospitals' own heart-disease exports: one outside the UCI four (Pecs: Hungary's rows
    without the `dataset` column, UCI's `thalach` spelling), and Cleveland's and VA's own files."""
    folder.mkdir(parents=True)
    uci = heart.load_frame()
    pecs = uci[uci["dataset"] == "Hungary"].drop(columns=["dataset"]).rename(columns={"thalch": "thalach"})
    files = {
        "Pecs": pecs,
        "Cleveland": uci[uci["dataset"] == "Cleveland"],
        "VA Long Beach": uci[uci["dataset"] == "VA Long Beach"],
    }
    own = {}
    for name, rows in files.items():
        path = folder / f"{name.replace(' ', '-').lower()}.csv"
        rows.to_csv(path, index=False)
        own[name] = str(path)
    return own


def test_secure_federation_survives_a_server_crash(
    heart_registry: Path, procs: ProcessGroups, tmp_path: Path
) -> None:
    """TLS, node authentication, DP and SecAgg+, each hospital on its own CSV; the SuperLink is
    SIGKILLed after round 1's checkpoint, restarts on its state database, and the resumed run
    finishes round 2.

    One test for both "a deployment produces a model" and "a crashed server resumes": SecAgg+
    rounds take over a minute here, and two separate deployments would double the suite's time.
    """
    # Prepare
    cfg = demo_config(
        "heart-disease",
        num_rounds=2,
        local_epochs=1,
        registry_dir=str(heart_registry),
        secure_aggregation=True,
    )
    assert cfg.study.dp
    own = _own_csvs(tmp_path / "hospitals")
    console, shown = _console()
    deployment = LocalDeployment(
        DeploymentDemoOptions(cfg, tmp_path / "run", tmp_path / "work", own_data=own), console, procs
    )
    first_link = deployment.start_superlink()
    nodes = deployment.start_nodes()
    lines: list[str] = []
    killed: list[int] = []
    worker_pid_file = worker_dir(deployment.paths.site_dir(deployment.hospitals[0])) / PID_FILE
    killed_workers: list[int] = []

    def crash_after_round_1(_: float, line: str) -> None:
        lines.append(line)
        if "checkpoint of round 1 written" in line and not killed:
            assert first_link.process is not None
            killed.append(first_link.process.pgid)
            procs.kill(first_link.process)  # SIGKILL to the SuperLink's whole process group
            killed_workers.append(int(worker_pid_file.read_text()))
            os.kill(killed_workers[0], signal.SIGKILL)  # and the first hospital's site worker

    # Execute: the run dies with its SuperLink, which restarts on its state database
    with pytest.raises(DeploymentError, match="SuperLink exited"):
        deployment.run(resume=False, on_line=crash_after_round_1)
    checkpoint = load_checkpoint(deployment.paths.checkpoints)
    assert checkpoint is not None and checkpoint.round == 1
    assert not (tmp_path / "run").exists()
    deployment.start_superlink()
    out = deployment.run(resume=True, on_line=lambda _, line: lines.append(line))

    # Assert: the commands shown are the secured ones
    text = shown.getvalue()
    assert "flower-superlink --ssl-certfile" in text and "--enable-supernode-auth" in text
    assert (
        text.count("client.runtime.supernode --idle-poll 0.5 --superlink 127.0.0.1:") == 3
        and "--auth-supernode-private-key" in text
    )
    assert "--insecure" not in text
    # SecAgg+ aggregated round 1 before the crash and round 2 after it
    assert sum("Secure aggregation completed" in line for line in lines) == 2
    assert "round 1/2:" in text and "round 2 of 2 (resumed after round 1)" in text and "round 2/2:" in text
    # The SuperLink's group died; the hospitals' SuperNodes survived and served the resumed run
    assert killed and not group_alive(killed[0])
    assert all(node.alive() for node in nodes)
    assert "Node keys: pecs already registered" in text
    # A model came out, with its card: DP at every site, both rounds evaluated, the resume stated
    payload = torch.load(out / "model.pt", weights_only=False)
    assert set(payload["state_dict"]) == {"head.weight", "head.bias"}
    final = load_checkpoint(deployment.paths.checkpoints)
    assert final is not None and final.round == 2
    assert torch.equal(payload["state_dict"]["head.bias"], torch.from_numpy(final.arrays[1]))
    card = json.loads((out / "model_card.json").read_text())
    assert card["privacy"]["dp"] is True and card["rounds"] == 2
    assert sorted(card["privacy"]["per_site"]) == sorted(own)
    # Each hospital trained on its own data whole, split its own way: the counts it reported are its own
    balance = card["data"]["class_balance_per_site"]
    for name, path in own.items():
        expected, _ = load_own(cfg.study, OwnData(path, name))
        assert sum(balance[name]["train"].values()) == expected.num_train
        assert sum(balance[name]["val"].values()) == expected.num_val
    assert card["resumed"]["resumed_after_round"] == 1
    assert [s["first_round"] for s in card["resumed"]["flower_runs"]] == [1, 2]
    across = card["resumed"]["privacy_per_site_all_runs"]
    assert set(across) == set(own)
    assert all(across[site]["epsilon"] > card["privacy"]["per_site"][site]["epsilon"] > 0 for site in across)
    # Each row is the model it measures (0: the initial one, carried by round 1's fit before the crash)
    assert {1, 2} <= {row["round"] for row in json.loads((out / "metrics.json").read_text())["rounds"]} <= {0, 1, 2}
    # The killed site worker lost nothing: a new one trained round 2, both rounds charged and audited
    first_site = deployment.paths.site_dir(deployment.hospitals[0])
    assert int(worker_pid_file.read_text()) != killed_workers[0]
    assert sorted(entry.round for entry in PrivacyLedger.open(first_site).entries()) == [1, 2]
    audited = [json.loads(line) for line in (first_site / AUDIT_FILE).read_text().splitlines()]
    assert {r["round"] for r in audited if r["message_type"] == "train" and r["decision"] == ACCEPTED} >= {1, 2}
    # The resumed run delivered the final model to every hospital, bit for bit
    for hospital in deployment.hospitals:
        (copy,) = (deployment.paths.site_dir(hospital) / "models").glob("*/model.pt")
        assert copy.read_bytes() == (out / "model.pt").read_bytes(), hospital


def test_unregistered_node_key_is_refused(
    consortium: ConsortiumLayout, procs: ProcessGroups, tmp_path: Path
) -> None:
    # Prepare: only hungary's key is registered
    options, link = _tls_superlink(procs, consortium, tmp_path)
    assert register_nodes(link, {"hungary": consortium.node_pub("hungary")}, announce=print) == {
        "hungary": "registered"
    }

    # Execute
    hungary = start_supernode(
        procs,
        _node(consortium, "hungary", options.address, tmp_path),
        home=tmp_path / "h1",
        announce=print,
        name="hungary",
    )
    intruder = start_supernode(
        procs, _node(consortium, "intruder", options.address, tmp_path), home=tmp_path / "h2", announce=print, name="intruder", wait=False
    )  # fmt: skip

    # Assert: the registered node was accepted, the other one refused and exited
    assert hungary.alive()
    assert intruder.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in intruder.output()
    assert "SuperNode ID" not in intruder.output()
    # ... and `carefl node` says why, and how to fix it
    again = replace(_node(consortium, "intruder", options.address, tmp_path), max_wait_time=None)
    prepare_site_dir(again.site_dir, site="Intruder")
    with pytest.raises(DeploymentError) as refused:
        serve_node(again, _console()[0], connect_timeout=60)
    assert "exited with status" in str(refused.value) and "is not registered with the SuperLink" in str(
        refused.value
    )
    assert "flwr supernode register" in str(refused.value)


def test_node_without_tls_cannot_connect(
    consortium: ConsortiumLayout, procs: ProcessGroups, tmp_path: Path
) -> None:
    # Prepare
    options, link = _tls_superlink(procs, consortium, tmp_path)
    register_nodes(link, {"hungary": consortium.node_pub("hungary")}, announce=print)

    # Execute: a node speaking plain HTTP to the TLS SuperLink, giving up after 8 s
    plain = start_supernode(
        procs, _node(consortium, "hungary", options.address, tmp_path, tls=False), home=tmp_path / "h", announce=print,
        name="plain", wait=False,
    )  # fmt: skip

    # Assert
    assert plain.wait(timeout=90) != 0
    assert "SuperNode ID" not in plain.output()
    assert "Connection attempt failed" in plain.output()
    # `carefl node` does not retry forever: it stops after its connect timeout and names the mismatch
    node = replace(_node(consortium, "hungary", options.address, tmp_path, tls=False), max_wait_time=None)
    prepare_site_dir(node.site_dir, site="Hungary")
    started = time.monotonic()
    with pytest.raises(DeploymentError) as mismatch:
        serve_node(node, _console()[0], connect_timeout=10)
    assert time.monotonic() - started < 40
    assert "was not accepted within 10 s" in str(mismatch.value)
    assert "the SuperLink speaks TLS but this node runs with --insecure" in str(mismatch.value)


PARTITION = ("--partition-id", "0", "--num-partitions", "3")
"""The node holds UCI Hungary, partition 0 of the heart-disease benchmark's built-in data."""


def test_carefl_server_and_node_commands_stop_their_processes(
    consortium: ConsortiumLayout, procs: ProcessGroups, tmp_path: Path
) -> None:
    # Prepare
    port = free_port()
    site = tmp_path / "site"
    carefl = [sys.executable, "-m", "server.local.cli"]
    env = flower_env()

    # Execute: the commands an operator types, as processes; then Ctrl-C-like SIGTERM to each
    refused = procs.start("node-unprepared", [*carefl, "node", "--superlink", f"127.0.0.1:{port}", "--site-dir", str(site),
                                              "--credentials", str(consortium.hospital_dir("hungary")), *PARTITION], env=env)  # fmt: skip
    assert refused.wait(timeout=120) == 2
    procs.start(
        "budget", [*carefl, "budget", "--site-dir", str(site), "--init", "--site", "Hungary"], env=env
    ).wait(timeout=120)
    server = procs.start(
        "carefl-server",
        [
            *carefl,
            "server",
            "--consortium",
            str(consortium.root),
            "--state-dir",
            str(tmp_path / "state"),
            "--port",
            str(port),
        ],
        env=env,
    )
    server.wait_for_output("SuperLink ready on 127.0.0.1", timeout=120)
    second = procs.start(
        "carefl-server-2",
        [
            *carefl,
            "server",
            "--consortium",
            str(consortium.root),
            "--state-dir",
            str(tmp_path / "state"),
            "--port",
            str(free_port()),
        ],
        env=env,
    )
    assert second.wait(timeout=120) == 4
    node = procs.start(
        "carefl-node",
        [*carefl, "node", "--superlink", f"127.0.0.1:{port}", "--site-dir", str(site),
         "--credentials", str(consortium.hospital_dir("hungary")), *PARTITION, "--port", str(free_port())],
        env=env,
    )  # fmt: skip
    node.wait_for_output(r"SuperNode ID: \d+", timeout=120)
    inner = procs.groups() - {server.pgid, node.pgid, refused.pgid}
    for command in (node, server):  # SIGTERM to the carefl process alone: it must stop its children
        os.kill(command.pid, signal.SIGTERM)
        command.wait(timeout=60)

    # Assert: each printed its Flower command, registered keys, and took its processes along
    assert "error: " in refused.output() and "carefl budget" in refused.output()
    assert executable("flower-superlink") in server.output() and "--enable-supernode-auth" in server.output()
    assert "Node keys: hungary registered, intruder registered" in server.output()
    assert "client.runtime.supernode --idle-poll 0.5 --superlink" in node.output()
    # A second server on the same state folder was refused, and left the live one alone
    refusal = [line for line in second.output().splitlines() if line.startswith("error:")]
    assert (
        len(refusal) == 1
        and f"another `carefl server` (pid {server.pid}) runs on the state folder" in refusal[0]
    )
    assert "started superlink" not in second.output() and "interrupted" not in second.output()
    assert server.returncode == EXIT_TERMINATED and node.returncode == EXIT_TERMINATED
    assert inner and not [g for g in inner if group_alive(g)]
