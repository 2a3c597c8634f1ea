"""The site worker: a long-lived process per hospital that trains and evaluates for its tasks.

:mod:`client.worker.process` is the worker, :mod:`client.worker.link` the task process's side,
:mod:`client.worker.channel` the local channel (Unix socket 0600, per-start secret) and
:mod:`client.worker.wire` what crosses it.
"""
