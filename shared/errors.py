"""Error types of CareFL.

Every error a user can cause (bad file, bad value, tampered weights) derives from
:class:`CareFLError`; the command line prints its message on one line and exits non-zero,
without a traceback. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class CareFLError(Exception):
    """Base class of errors whose message is meant for the operator."""


class InputError(CareFLError):
    """A file or directory given by the user is missing, unreadable or malformed."""


class ConfigError(CareFLError):
    """A configuration value is unknown or out of range."""


class IntegrityError(CareFLError):
    """Content does not match the hash it is expected to have (tampered or truncated)."""


class DeploymentError(CareFLError):
    """A Flower process (SuperLink, SuperNode, ``flwr``) failed to start, to connect or to finish."""
