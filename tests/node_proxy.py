"""A stand-in for a node's connection, for tests that call a Flower strategy directly."""

from __future__ import annotations

from flwr.server.client_proxy import ClientProxy


class NodeProxy(ClientProxy):
    """A node's connection as a strategy sees it: passed through, never called (a collaborator only)."""

    def get_properties(self, *a, **k):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_parameters(self, *a, **k):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def fit(self, *a, **k):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def evaluate(self, *a, **k):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def reconnect(self, *a, **k):  # type: ignore[no-untyped-def]
        raise NotImplementedError
