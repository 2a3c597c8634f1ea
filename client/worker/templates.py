"""Built models kept by the site worker across messages, handed out as copies.

Building a model is most of a warm message's cost (MobileNetV2: its layers initialised, then
the verified weights loaded, about 0.5 s of a 0.6 s evaluation here). The worker builds each
study's model once and hands out deep copies, so no message sees another's training. The
global torch RNG is left as :func:`shared.pipeline.build_model` leaves it (it reseeds it), so
a copy trains exactly as a freshly built model would.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch

from shared.config import StudyConfig
from shared.pipeline import Pretrained, build_model

MAX_TEMPLATES = 4
"""Studies whose built model is kept (the least recently used one is dropped)."""


class ModelTemplates:
    """Built models of the studies this site worker served, by study and backbone."""

    def __init__(self, capacity: int = MAX_TEMPLATES) -> None:
        self.capacity = capacity
        self._built: OrderedDict[tuple[str, str], tuple[torch.nn.Module, torch.Tensor]] = OrderedDict()

    def build(self, cfg: StudyConfig, pretrained: Pretrained | None) -> torch.nn.Module:
        """What ``build_model(cfg, pretrained)`` returns, from a kept copy when there is one."""
        key = (cfg.model_dump_json(), pretrained.manifest.sha256 if pretrained is not None else "")
        if key not in self._built:
            model = build_model(cfg, pretrained)
            self._built[key] = (copy.deepcopy(model), torch.get_rng_state())
            while len(self._built) > self.capacity:
                self._built.popitem(last=False)
            return model
        self._built.move_to_end(key)
        template, rng_state = self._built[key]
        torch.set_rng_state(rng_state)
        return copy.deepcopy(template)
