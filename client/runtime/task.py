"""One ClientApp task of the site: check the run's app, then run the hospital's installed CareFL.

Flower's ``flwr-clientapp`` installs the FAB it pulls and runs the ClientApp inside it, so the
code that charges the ledger and writes the audit log would be the server's. This runner keeps
its protocol (it pulls and pushes with Flower's own functions) and changes what runs: the FAB's
bytes are hashed and checked against the site policy (:func:`client.policy.check_app`); an
approved app's message is answered by the ClientApp of the CareFL installed at the hospital
(:data:`client.app.app`), never by code from the FAB, which is neither unpacked nor imported.
A FAB that is not approved is answered with ``Error(code=APP_REFUSED)`` naming its SHA-256,
and the refusal is appended to the site's audit log.

With the site worker (the default), the site runtime calls :func:`run_task` itself for every
task, with the ClientApp whose training runs in the worker. Without it, the runtime starts
``python -P -m client.runtime.task --runtime-api-address A --token T [--parent-pid P]`` per
message, and this process also trains, as with plain Flower.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from logging import ERROR, INFO, WARNING

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from client.audit import AuditLog, AuditRecord
from client.audit_mod import payload_digest
from client.policy import AppNotApproved, SitePolicy, check_app
from client.site import site_environment
from shared.errors import CareFLError
from shared.fab import fab_sha256
from shared.log import log
from shared.protocol import APP_REFUSED, SITE_REFUSED

InstalledApp = Callable[[], ClientAppCallable]
"""Returns the ClientApp (or an equivalent callable) to run for an approved app."""


def installed_client_app() -> ClientApp:
    """The hospital's installed CareFL ClientApp (:data:`client.app.app`), training in this process."""
    from client.app import app

    return app


def answer(
    message: Message,
    context: Context,
    fab_content: bytes,
    *,
    fab_id: str = "",
    installed: InstalledApp = installed_client_app,
) -> Message:
    """The site's reply to ``message`` of a run whose app is the FAB ``fab_content``.

    Parameters
    ----------
    message, context : Message, Context
        What the SuperNode handed over (the context carries the node config: site directory, policy).
    fab_content : bytes
        The run's FAB; only its SHA-256 is used (computed here, not taken from the server).
    fab_id : str
        ``publisher/name`` of the run's app, as the server names it (shown in a refusal).
    installed : InstalledApp
        The ClientApp run for an approved app (default: the installed CareFL's).

    Returns
    -------
    Message
        The installed ClientApp's reply; or an error reply: :data:`~shared.protocol.APP_REFUSED`
        naming the FAB's SHA-256 (appended to the audit log), :data:`~shared.protocol.SITE_REFUSED`
        when the site's policy cannot be read.
    """
    sha256 = fab_sha256(fab_content)
    try:
        env = site_environment(context, {})
        site = env.site_dir.name
        check_app(SitePolicy.load(env.policy_path), sha256, fab_id)
    except AppNotApproved as refusal:
        reply = Message(Error(code=APP_REFUSED, reason=f"{site}: {refusal}"), reply_to=message)
        _audit_refusal(env.site_dir, message, reply)
        log(WARNING, "refused run %d: %s", message.metadata.run_id, refusal)
        return reply
    except CareFLError as err:
        log(ERROR, "refused run %d: %s", message.metadata.run_id, err)
        return Message(Error(code=SITE_REFUSED, reason=str(err)), reply_to=message)
    log(INFO, "run %d: app %s approved (SHA-256 %s); running the installed CareFL", message.metadata.run_id,
        fab_id or "?", sha256)  # fmt: skip
    return installed()(message=message, context=context)


def _audit_refusal(site_dir: object, message: Message, reply: Message) -> None:
    """Append the refusal of ``message`` (an error reply, nothing else left) to the site's audit log."""
    from pathlib import Path

    sha256, size = payload_digest(reply)
    AuditLog(Path(str(site_dir))).append(
        AuditRecord(
            run_id=str(message.metadata.run_id),
            round=None,
            message_type=message.metadata.message_type,
            secagg_stage=None,
            reply_to=str(message.metadata.message_id),
            payload_sha256=sha256,
            payload_bytes=size,
            epsilon=None,
            decision=f"refused: {reply.error.reason}",
        )
    )


def run_task(
    runtime_api_address: str, token: str, *, parent_pid: int | None = None, installed: InstalledApp = installed_client_app
) -> int:
    """Pull one task from the SuperNode's Runtime API, answer it (:func:`answer`), push the reply.

    Mirrors Flower's ``flwr.supernode.runtime.run_clientapp.run_clientapp`` with the FAB
    installation and loading replaced by :func:`answer`, which runs ``installed``. Returns the
    exit status (0: a reply left).
    """
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    retry_invoker = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry_invoker,
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context: Context | None = None
    message: Message | None = None
    reply: Message | None = None
    sub_status, details, status = SubStatus.FAILED, "ClientApp task failed due to unknown reason", 1
    try:
        message, context, run, fab = pull_task_input(client)
        reply = answer(message, context, fab.content, fab_id=run.fab_id, installed=installed)
        sub_status, details, status = SubStatus.COMPLETED, "", 0
        if reply.has_error() and reply.error.code == APP_REFUSED:
            sub_status, details = SubStatus.FAILED, reply.error.reason
    except Exception as ex:  # pylint: disable=broad-exception-caught  # as Flower's run_clientapp
        log(ERROR, "ClientApp raised an exception", exc_info=ex)
        details = f"{type(ex)}:<'{ex}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        if reply is not None and context is not None:
            try:
                push_message(client, reply, context)
            except Exception as ex:  # pylint: disable=broad-exception-caught
                log(ERROR, "Failed to push reply message", exc_info=ex)
                status = 1
        retry_invoker.max_tries = 1
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    return status


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: ``python -P -m client.runtime.task --runtime-api-address A --token T [--parent-pid P]``."""
    from shared.offline import configure_flower_env

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    configure_flower_env()
    raise SystemExit(run_task(args.runtime_api_address, args.token, parent_pid=args.parent_pid))


if __name__ == "__main__":
    main()
