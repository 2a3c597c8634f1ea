"""The Flower command lines CareFL builds: every flag exists in the installed Flower, values survive
Flower's own parsers, and what is printed is the command that runs."""

from __future__ import annotations

import os
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
from flwr.cli.flower_config import parse_superlink_connection
from flwr.common.config import parse_config_args

from client.node import NodeCredentials, NodeOptions, node_config_arg, supernode_command
from client.runtime.supernode import flower_arguments
from server.flwr_cli import (
    Connection,
    list_command,
    log_command,
    parse_run_id,
    parse_run_status,
    register_command,
    run_command,
    run_config_toml,
)
from server.superlink import SuperLinkOptions, SuperLinkTLS, superlink_command
from shared.config import RunConfig
from shared.errors import ConfigError, DeploymentError, InputError
from shared.executables import command_line, executable, flower_env, scripts_dir

TLS = SuperLinkTLS(Path("/c/server.crt"), Path("/c/server.key"), Path("/c/ca.crt"))
CREDS = NodeCredentials(Path("/h/node.key"), Path("/h/ca.crt"))


def _help(*argv: str) -> str:
    done = subprocess.run(
        [executable(argv[0]), *argv[1:], "--help"],
        capture_output=True, text=True, timeout=120, check=True, env={**os.environ, **flower_env()},
    )  # fmt: skip
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def superlink_help() -> str:
    return _help("flower-superlink")


@pytest.fixture(scope="module")
def supernode_help() -> str:
    return _help("flower-supernode")


def _flags(argv: list[str]) -> list[str]:
    return [a for a in argv if a.startswith("--")]


def _supernode_flags(argv: list[str]) -> list[str]:
    return _flags(flower_arguments(argv))


def test_superlink_command_uses_tls_node_auth_and_database(superlink_help: str) -> None:
    # Execute
    argv = superlink_command(SuperLinkOptions(tls=TLS, database=Path("/s/state.db"), port=9999))

    # Assert: TLS files, auth, state, address; every flag is one the installed Flower knows
    assert argv[argv.index("--ssl-certfile") + 1] == "/c/server.crt"
    assert argv[argv.index("--ssl-keyfile") + 1] == "/c/server.key"
    assert argv[argv.index("--ssl-ca-certfile") + 1] == "/c/ca.crt"
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    assert argv[argv.index("--database") + 1] == "/s/state.db"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "9999"
    for flag in _flags(argv):
        assert flag in superlink_help, flag


def test_insecure_superlink_is_explicit_and_cannot_authenticate_nodes(superlink_help: str) -> None:
    argv = superlink_command(SuperLinkOptions(tls=None, node_auth=False))
    assert "--insecure" in argv and "--enable-supernode-auth" not in argv and "--ssl-certfile" not in argv
    assert argv[argv.index("--port") + 1] == "8000"  # Flower's default
    for flag in _flags(argv):
        assert flag in superlink_help, flag
    with pytest.raises(ConfigError, match="node authentication needs TLS"):
        SuperLinkOptions(tls=None)


def test_superlink_tls_from_an_incomplete_consortium_is_refused(tmp_path: Path) -> None:
    from server.provision import ConsortiumLayout

    with pytest.raises(InputError, match="server.crt"):
        SuperLinkTLS.from_consortium(ConsortiumLayout(tmp_path))


def test_supernode_command_authenticates_and_passes_the_site(supernode_help: str, tmp_path: Path) -> None:
    # Prepare
    options = NodeOptions(
        superlink="127.0.0.1:8000", site_dir=tmp_path / "my site", credentials=CREDS, site_name="Hospital B",
        data_path="/data/heart.csv", policy=tmp_path / "policy.toml", port=9101, max_wait_time=30,
    )  # fmt: skip

    # Execute
    argv = supernode_command(options)

    # Assert
    assert argv[argv.index("--superlink") + 1] == "127.0.0.1:8000"
    assert argv[argv.index("--root-certificates") + 1] == "/h/ca.crt"
    assert argv[argv.index("--auth-supernode-private-key") + 1] == "/h/node.key"
    assert argv[argv.index("--port") + 1] == "9101" and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "--insecure" not in argv
    for flag in _supernode_flags(argv):
        assert flag in supernode_help, flag
    # The node config reaches the ClientApp as client.site reads it, spaces in paths included
    parsed = parse_config_args([argv[argv.index("--node-config") + 1]])
    assert parsed == {
        "site-name": "Hospital B",
        "site-dir": str((tmp_path / "my site").resolve()),
        "data-path": "/data/heart.csv",
        "policy": str((tmp_path / "policy.toml").resolve()),
    }


def test_insecure_supernode_sends_no_key(supernode_help: str, tmp_path: Path) -> None:
    argv = supernode_command(NodeOptions(superlink="127.0.0.1:8000", site_dir=tmp_path, credentials=None, partition=(0, 3)))
    assert "--insecure" in argv
    assert "--auth-supernode-private-key" not in argv and "--root-certificates" not in argv
    for flag in _supernode_flags(argv):
        assert flag in supernode_help, flag


def test_node_config_refuses_what_flowers_parser_cannot_carry() -> None:
    assert node_config_arg({"partition-id": 1, "site-dir": "/a b"}) == 'partition-id=1 site-dir="/a b"'
    with pytest.raises(ConfigError, match="site-dir"):
        node_config_arg({"site-dir": 'a"b'})


def test_node_credentials_need_the_hospital_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="node.key"):
        NodeCredentials.from_dir(tmp_path)


def test_flwr_subcommands_use_existing_options() -> None:
    # Prepare
    conn = Connection("127.0.0.1:8000", Path("/c/ca.crt"))
    cases = [
        (register_command(Path("/k/a.pub"), conn, name="hungary"), ("supernode", "register")),
        (run_command(Path("/app"), conn, Path("/r.toml")), ("run",)),
        (log_command(7, conn), ("log",)),
        (list_command(7, conn), ("ls",)),
    ]

    # Execute / Assert: positional arguments in Flower's order, each option documented
    for argv, sub in cases:
        assert argv[1 : 1 + len(sub)] == list(sub)
        assert conn.name in argv
        text = _help("flwr", *sub)
        for flag in _flags(argv):
            assert flag in text, (sub, flag)


def test_connection_is_what_flwr_reads(tmp_path: Path) -> None:
    # Execute
    secure = tomllib.loads(Connection("127.0.0.1:8000", tmp_path / "ca.crt").to_toml())
    insecure = tomllib.loads(Connection("127.0.0.1:8001", None, name="plain").to_toml())

    # Assert: Flower's parser accepts both; TLS one names the CA, the other is explicit
    conn = parse_superlink_connection(secure["superlink"]["carefl"], "carefl")
    assert secure["superlink"]["default"] == "carefl"
    assert conn.address == "127.0.0.1:8000" and conn.root_certificates == str((tmp_path / "ca.crt").resolve())
    assert not conn.insecure
    assert parse_superlink_connection(insecure["superlink"]["plain"], "plain").insecure


def test_run_config_file_round_trips_through_flower(tmp_path: Path) -> None:
    # Prepare: every key of CareFL's run config, a path with spaces and quotes
    values = RunConfig.of(run_dir='/runs/a "b" c', checkpoint_dir="/ck", resume=True).to_run_config()
    path = tmp_path / "run-config.toml"

    # Execute
    path.write_text(run_config_toml(values))

    # Assert
    assert parse_config_args([str(path)]) == values


def test_printed_command_is_the_command_run() -> None:
    argv = ["/bin/flower-supernode", "--node-config", 'site-dir="/a b"', "--port", "1"]
    line = command_line(argv, {"FLWR_HOME": "/h o/me", "PATH": "ignored"})
    assert shlex.split(line) == ["FLWR_HOME=/h o/me", f"PATH={scripts_dir()}:$PATH", *argv]


def test_flwr_outputs_are_parsed_or_refused() -> None:
    assert parse_run_id('Using SuperLink\n{"success": true, "run-id": "42"}') == 42
    assert parse_run_status('{"success": true, "runs": [{"status": "finished:completed"}]}') == "finished:completed"
    with pytest.raises(DeploymentError, match="flwr run"):
        parse_run_id('{"success": false, "error-message": "no"}')
    with pytest.raises(DeploymentError, match="flwr ls"):
        parse_run_status("connection refused")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["server"], "--consortium is required"),
        (["server", "--insecure", "--consortium", "c"], "one of --consortium or --insecure"),
        (["node", "--superlink", "127.0.0.1:8000", "--site-dir", "s"], "--credentials, or --insecure"),
        (["federate"], "start the SuperLink with `carefl server` first"),
        (["demo", "--resume"], "give --deployment and its --out"),
    ],
)
def test_deployment_commands_refuse_bad_input_in_one_line(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: relative paths land in an empty folder
    from server.local.cli import main
    from shared.errors import EXIT_USAGE

    monkeypatch.chdir(tmp_path)

    # Execute
    code = main(argv)

    # Assert
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert [line for line in err.splitlines() if line.startswith("error:")], err
    assert needle in " ".join(err.split()), err
    assert "Traceback" not in err


def test_federate_refuses_unknown_run_config_keys_before_submitting(tmp_path: Path) -> None:
    from server.service import FederateOptions

    options = FederateOptions(tmp_path, {"num-rounds": 3, "learning_rate": 0.1}, out_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="learning_rate"):
        options.run_config()
    assert FederateOptions(tmp_path, {"num-rounds": 3}, checkpoint_dir=Path("ck"), resume=True).run_config() == {
        "num-rounds": 3, "checkpoint-dir": str(Path("ck").resolve()), "resume": True,
        "registry-dir": str(Path(".carefl/registry").resolve()),  # `carefl pretrain`'s, by default
    }  # fmt: skip
