"""Which tensors travel, and how they turn into numpy arrays and back.

Only the exchanged state crosses the network: with a frozen backbone, the head's parameters;
when everything is trained, every parameter and every floating-point buffer (BatchNorm running
statistics). Integer buffers (``num_batches_tracked``) never leave a site.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

HEAD_PREFIX = "head."


def exchanged_names(model: nn.Module, trainable: str) -> list[str]:
    """Return the state-dict keys that are shared with the server, in a fixed order.

    Parameters
    ----------
    model : nn.Module
        A :class:`~shared.backbones.architectures.BackboneWithHead`.
    trainable : str
        ``head``, ``last`` (the trainable parameters) or ``full``.
    """
    state = model.state_dict()
    if trainable == "head":
        return [k for k in state if k.startswith(HEAD_PREFIX)]
    if trainable == "last":
        trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
        return [k for k in state if k in trainable_names]
    if trainable == "full":
        return [k for k, v in state.items() if torch.is_floating_point(v)]
    raise ValueError(f"unknown trainable mode {trainable!r}")


def get_arrays(model: nn.Module, names: Sequence[str]) -> list[np.ndarray]:
    """Copy the named tensors out of ``model`` as float32 numpy arrays."""
    state = model.state_dict()
    return [state[n].detach().cpu().numpy().astype(np.float32, copy=True) for n in names]


def set_arrays(model: nn.Module, names: Sequence[str], arrays: Sequence[np.ndarray]) -> None:
    """Load ``arrays`` into the named tensors of ``model``.

    Raises
    ------
    ValueError
        If the number of arrays or any shape differs from the model's.
    """
    if len(arrays) != len(names):
        raise ValueError(f"expected {len(names)} arrays, got {len(arrays)}")
    state = model.state_dict()
    update = {}
    for name, array in zip(names, arrays, strict=True):
        if tuple(array.shape) != tuple(state[name].shape):
            raise ValueError(
                f"{name}: expected shape {tuple(state[name].shape)}, got {tuple(array.shape)}"
            )
        update[name] = torch.from_numpy(np.asarray(array)).to(state[name].dtype)
    model.load_state_dict(update, strict=False)


def subtract(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Return ``a - b`` element-wise (a delta from a reference model)."""
    return [np.asarray(x, dtype=np.float32) - np.asarray(y, dtype=np.float32) for x, y in zip(a, b, strict=True)]


def add(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Return ``a + b`` element-wise (a reference model plus a delta)."""
    return [np.asarray(x, dtype=np.float32) + np.asarray(y, dtype=np.float32) for x, y in zip(a, b, strict=True)]


def serialized_bytes(arrays: Sequence[np.ndarray]) -> int:
    """Return the size of ``arrays`` as Flower serializes them (``.npy`` per array)."""
    from flwr.common import ndarray_to_bytes

    return sum(len(ndarray_to_bytes(np.asarray(a))) for a in arrays)


def full_model_bytes(model: nn.Module) -> int:
    """Return the serialized size of every floating-point tensor of ``model``."""
    return serialized_bytes(get_arrays(model, exchanged_names(model, "full")))
