"""What the consortium's server and the hospitals' nodes must agree on, and the ML core.

- the contract: :mod:`shared.protocol` (wire names), :mod:`shared.config` (the study each site
  receives), :mod:`shared.secagg` and :mod:`shared.masks` (secure aggregation);
- the ML core: :mod:`shared.tasks`, :mod:`shared.backbones`, :mod:`shared.pipeline`,
  :mod:`shared.features`, :mod:`shared.training`, :mod:`shared.dp` (with :mod:`shared.dp_linear`),
  :mod:`shared.privacy`;
- the common plumbing: errors, log, atomic writes, hashing, the Flower environment, processes.

It imports neither :mod:`server` nor :mod:`client` (``tests/test_layering.py``). Network use:
:mod:`shared.processes` starts Flower's processes and probes the ports they listen on, and the
backbone registry downloads torchvision's published weights for online users when no local copy
exists (``allow_download``); nothing else here opens a connection.
"""

from shared.errors import (
    CareFLError,
    ConfigError,
    DeploymentError,
    InputError,
    IntegrityError,
    RefusalError,
)

__all__ = ["CareFLError", "ConfigError", "DeploymentError", "InputError", "IntegrityError", "RefusalError"]
