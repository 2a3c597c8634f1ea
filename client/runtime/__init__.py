"""The hospital's own runtime: which code runs on the site's data is the hospital's decision.

With ``flower-supernode --isolation process``, the SuperNode runs no app itself: it queues each
message of the server for a process that pulls it from its Runtime API. ``carefl node`` starts
that process (:mod:`client.runtime.superexec`, in place of Flower's ``flower-superexec``) from
the hospital's installed CareFL. For each message it starts :mod:`client.runtime.task` (in place
of ``flwr-clientapp``), which pulls the message, its context and the FAB of the run, checks the
FAB's SHA-256 against the site policy's ``apps.approved``, and then runs the *installed* CareFL
ClientApp (:mod:`client.app`): policy check, ledger charge, DP training, delta bound and audit
are the hospital's code. The FAB is never installed, unpacked or imported. A FAB that is not
approved gets an error reply (:data:`shared.protocol.APP_REFUSED`) naming its SHA-256, and the
refusal is appended to the site's audit log.

Flower's protocol is kept: the processes speak the SuperNode's Runtime API with Flower's own
client functions (``AcquireTask``, ``pull_task_input``, ``push_message``, ``push_task_output``,
the task heartbeat).
"""
