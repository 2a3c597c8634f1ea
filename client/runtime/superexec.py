"""The site runtime: Flower's ``flower-superexec`` loop, answering tasks with CareFL's task runner.

It polls the SuperNode's Runtime API for ClientApp tasks (``AcquireTask``) and answers each
with :func:`client.runtime.task.run_task` (the app's hash checked, the installed CareFL run,
never the FAB's code); it ends when the SuperNode it serves ends. Given the site directory, it
first starts the site's long-lived worker (:mod:`client.worker`). Each task then runs in this
process, one at a time: CareFL's mods (audit, refusal, backbone offer, model delivery, SecAgg+)
run here, and training and evaluation in the worker, so no message starts a process. Without
the worker, each task runs in a fresh :mod:`client.runtime.task` process that also trains, as
with plain Flower. ``carefl node`` starts it next to its SuperNode
(:func:`client.service.start_supernode`); it is run as
``python -P -m client.runtime.superexec --runtime-api-address HOST:PORT --supernode-pid PID``
(``-P``: the working directory is not searched for modules).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.runtime.task import run_task
from shared.errors import CareFLError
from shared.log import log

if TYPE_CHECKING:
    from flwr.clientapp.typing import ClientAppCallable

POLL_INTERVAL_S = 0.1
"""Seconds between two ``AcquireTask`` polls (Flower's SuperExec: 1 s; a local HTTP call)."""
_SIGNED = frozenset({"/flwr.proto.Runtime/AcquireTask"})  # as flwr.supercore.superexec.run_superexec


def task_command(runtime_api_address: str, token: str, parent_pid: int) -> list[str]:
    """The command line of one task process (no site worker): this Python, ``-P``, the task runner."""
    return [
        sys.executable, "-P", "-m", "client.runtime.task",
        "--runtime-api-address", runtime_api_address, "--token", token, "--parent-pid", str(parent_pid),
    ]  # fmt: skip


def runtime_command(
    runtime_api_address: str,
    supernode_pid: int,
    *,
    auth_secret_file: Path | None = None,
    output: Path | None = None,
    site_dir: Path | None = None,
    site_worker: bool = True,
) -> list[str]:
    """The command line of the site's launcher serving the SuperNode ``supernode_pid``.

    With ``site_dir``, it starts the site worker (:mod:`client.worker`) at once, so that the
    first round does not wait for torch to load. Without ``site_worker``, every task trains in
    its own process.

    With ``auth_secret_file`` (the SuperNode's ``--superexec-auth-secret-file``), it signs its
    ``AcquireTask`` calls, so that no other process can take the SuperNode's tasks. With
    ``output``, it and its tasks append their output to that file (the SuperNode's log, so that
    ``carefl node`` shows one log).
    """
    argv = [
        sys.executable, "-P", "-m", "client.runtime.superexec",
        "--runtime-api-address", runtime_api_address, "--supernode-pid", str(supernode_pid),
    ]  # fmt: skip
    if auth_secret_file is not None:
        argv += ["--auth-secret-file", str(auth_secret_file)]
    if site_dir is not None:
        argv += ["--site-dir", str(site_dir)]
    if not site_worker:
        argv.append("--no-site-worker")
    return argv + (["--output", str(output)] if output is not None else [])


def serve(
    runtime_api_address: str,
    *,
    supernode_pid: int | None,
    auth_secret: bytes | None = None,
    launch: Callable[[Sequence[str]], subprocess.Popen[bytes]] = subprocess.Popen,
    poll_interval: float = POLL_INTERVAL_S,
    site_dir: Path | None = None,
    site_worker: bool = True,
) -> None:
    """Poll the SuperNode's Runtime API for ClientApp tasks and start a task process for each.

    Parameters
    ----------
    runtime_api_address : str
        ``host:port`` of the SuperNode's Runtime API (plain HTTP on this machine).
    supernode_pid : int, optional
        The SuperNode's process id: the launcher exits when it is gone.
    auth_secret : bytes, optional
        The SuperNode's SuperExec secret: ``AcquireTask`` calls are signed with it (Flower's HMAC).
    launch : Callable
        Starts a task process from its command line.
    poll_interval : float
        Seconds between polls.
    site_dir : Path, optional
        The hospital's site directory: its worker is started now (else by the first task).
    site_worker : bool
        The default: each task runs in this process, one at a time (its mods: audit, refusal,
        backbone offer, model delivery, SecAgg+), and hands training and evaluation to the
        site worker. Without it, each task runs in a fresh process that also trains, as with
        plain Flower.
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    if supernode_pid is not None:
        start_parent_process_monitor(supernode_pid)  # SIGINT to this process once the SuperNode is gone
    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if auth_secret is not None:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=auth_secret, protected_methods=_SIGNED))
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )
    running: list[subprocess.Popen[bytes]] = []
    log(INFO, "CareFL site runtime: serving the SuperNode's Runtime API at %s", runtime_api_address)
    if site_worker and site_dir is not None:
        from client.worker.link import WorkerLink

        try:
            WorkerLink(site_dir, parent_pid=os.getpid(), launch=launch).ensure()
        except CareFLError as err:  # the first task tries again, and fails its message if it cannot
            log(WARNING, "CareFL site runtime: the site worker did not start: %s", err)
    in_runtime = in_runtime_app() if site_worker else None
    try:
        while True:
            running = [task for task in running if task.poll() is None]  # reap finished tasks
            reply = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if reply.HasField("task") and reply.token:
                log(INFO, "CareFL site runtime: task %d of run %d", reply.task.task_id, reply.task.run_id)
                if in_runtime is not None:  # the mods run here, one task at a time; training in the worker
                    run_task(runtime_api_address, reply.token, installed=in_runtime)
                    continue
                running.append(launch(task_command(runtime_api_address, reply.token, os.getpid())))
            time.sleep(poll_interval)
    except KeyboardInterrupt:
        log(INFO, "CareFL site runtime: the SuperNode is gone; stopping")
    finally:
        client.close()


def in_runtime_app() -> Callable[[], ClientAppCallable]:
    """The installed ClientApp for tasks run inside this runtime: CareFL's mods, training in the worker.

    Built once: the mods need no torch, and the worker (started with this process as its
    parent) keeps the model and the data.
    """
    from client.app import create_worker_app

    app = create_worker_app(parent_pid=os.getpid())
    return lambda: app


def _append_output_to(path: Path) -> None:
    """Send this process's (and its children's) stdout and stderr to the end of ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    for stream in (1, 2):
        os.dup2(fd, stream)
    os.close(fd)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: ``python -P -m client.runtime.superexec --runtime-api-address A [--supernode-pid P]``."""
    from shared.offline import configure_flower_env

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--supernode-pid", type=int, default=None)
    parser.add_argument("--auth-secret-file", type=Path, default=None, help="the SuperNode's SuperExec secret")
    parser.add_argument("--output", type=Path, default=None, help="append stdout and stderr to this file")
    parser.add_argument("--site-dir", type=Path, default=None, help="start this site's worker at once")
    parser.add_argument("--no-site-worker", action="store_true", help="train in each task's own process")
    args = parser.parse_args(argv)
    if args.output is not None:
        _append_output_to(args.output)
    configure_flower_env()
    secret = args.auth_secret_file.read_bytes() if args.auth_secret_file is not None else None
    serve(
        args.runtime_api_address,
        supernode_pid=args.supernode_pid,
        auth_secret=secret,
        site_dir=args.site_dir,
        site_worker=not args.no_site_worker,
    )


if __name__ == "__main__":
    main()
