"""Import torchvision on a CPU build of torch.

The torchvision 0.28.0 wheel is a CUDA build; with the CPU torch wheel its ``_C`` extension
does not load and ``import torchvision`` fails with ``operator torchvision::nms does not exist``.
Registering the schemas of ``torchvision::nms`` and ``torchvision::qnms`` first makes models,
transforms and datasets importable (``torchvision.ops`` and ``torchvision.io`` stay unusable:
images are decoded with PIL). Import torchvision only through :func:`torchvision_module`.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from types import ModuleType


def _extension_loads() -> bool:
    """Return whether torchvision's compiled extension loads with this torch."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import glob
    import os

    import torch

    for location in spec.submodule_search_locations:
        for path in glob.glob(os.path.join(location, "_C*.so")):
            try:
                torch.ops.load_library(path)
                return True
            except (OSError, RuntimeError):
                return False
    return False


def _register_missing_schemas() -> None:
    """Define the operator schemas torchvision's Python code registers fakes for."""
    import torch

    library = torch.library.Library("torchvision", "DEF")  # noqa: F841 - must stay alive
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define(
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
    )
    # Keep a reference on the torch module so the library is not garbage collected.
    torch._carefl_torchvision_library = library


@functools.cache
def torchvision_module() -> ModuleType:
    """Return the ``torchvision`` module, applying the CPU shim when it is needed.

    Returns
    -------
    ModuleType
        The imported ``torchvision`` package.
    """
    if "torchvision" not in sys.modules and not _extension_loads():
        _register_missing_schemas()
    import torchvision

    return torchvision
