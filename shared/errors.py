"""Error types of CareFL, one kind per exit status.

Every error a user can cause derives from :class:`CareFLError`; the command line prints its
message on one line, without a traceback, and exits with the status of its kind, so a script
can tell a typo from a tampered file:

========================  ======  ==========================================================
kind                      status  meaning
========================  ======  ==========================================================
:class:`InputError`       2       a file or directory given is missing, unreadable, malformed
:class:`ConfigError`      2       a value or flag is unknown or out of range (usage)
:class:`IntegrityError`   3       content does not match what it must be (tampered, truncated)
:class:`DeploymentError`  4       a Flower process failed to start, to connect or to finish
:class:`RefusalError`     5       a site's policy or budget declined, or too few sites took part
========================  ======  ==========================================================

Programming errors stay ordinary exceptions.
"""

from __future__ import annotations

from typing import ClassVar

EXIT_USAGE = 2
EXIT_INTEGRITY = 3
EXIT_DEPLOYMENT = 4
EXIT_REFUSED = 5
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(BaseException):
    """SIGTERM arrived: stop as for Ctrl-C (every wait ends, every started process stops); exit 143.

    Not a ``KeyboardInterrupt``: click would turn that into its own Ctrl-C status, and not an
    ``Exception``: no ``except Exception`` on the way may swallow it.
    """


class CareFLError(Exception):
    """Base class of errors whose message is meant for the operator."""

    exit_code: ClassVar[int] = EXIT_USAGE


class InputError(CareFLError):
    """A file or directory given by the user is missing, unreadable or malformed."""


class ConfigError(CareFLError):
    """A configuration value is unknown or out of range."""


class IntegrityError(CareFLError):
    """Content does not match the hash or chain it is expected to have (tampered or truncated)."""

    exit_code = EXIT_INTEGRITY


class DeploymentError(CareFLError):
    """A Flower process (SuperLink, SuperNode, ``flwr``) failed to start, to connect or to finish."""

    exit_code = EXIT_DEPLOYMENT


class RefusalError(CareFLError):
    """A site declined (its policy, its privacy budget), or too few sites took part to go on."""

    exit_code = EXIT_REFUSED
