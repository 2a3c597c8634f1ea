"""CareFL shared code: data, models, backbones and helpers used by both server and client.

Nothing in this package talks to the network; ``server`` and ``client`` hold the Flower apps.
"""

from shared.errors import CareFLError, ConfigError, InputError, IntegrityError

__all__ = ["CareFLError", "ConfigError", "InputError", "IntegrityError"]
