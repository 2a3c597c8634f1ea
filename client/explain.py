"""``carefl predict --explain``: why the model said what it said, computed at the site and kept there.

Images get a Grad-CAM heatmap (Selvaraju et al., 2017) of the positive class overlaid on each
image; tabular records get Integrated Gradients attributions (Sundararajan et al., 2017) per
feature, as CSV columns and a bar plot. Both come from Captum (Meta's PyTorch interpretability
library): one well-kept dependency serves both kinds of data (pytorch-grad-cam has no Integrated
Gradients), and its ``LayerGradCam`` works on any layer of a plain ``nn.Module``.

Grad-CAM is taken at the deepest layer of the backbone whose feature map is still at least
:data:`MIN_CAM_SIDE` pixels wide: CareFL feeds small images (64 px by default), where
MobileNetV2's last block is 2x2 and its heatmap says nothing about where. Integrated Gradients
start from the all-zero input, which for standardized features is the site's average training
patient, and explain the probability of the positive class (their sum is that probability
minus the baseline's: completeness).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

    from client.trained import TrainedModel
    from shared.tasks.base import Records

MIN_CAM_SIDE = 7
"""Grad-CAM layer: the deepest whose feature map is at least this many pixels on its shorter side."""
POSITIVE = 1
"""The class explained (disease, pneumonia)."""
CAM_BATCH = 32
IG_STEPS = 64
MIN_OVERLAY_SIDE = 224
"""Overlays are drawn at least this many pixels wide (MedMNIST images are 28 px)."""
OVERLAY_ALPHA = 0.5


def cam_layer(module: nn.Module, sample: torch.Tensor, *, min_side: int = MIN_CAM_SIDE) -> nn.Module:
    """The layer Grad-CAM is taken at: the deepest backbone block with a feature map ``>= min_side``.

    The backbone's blocks (:func:`~shared.backbones.architectures.backbone_blocks`: MobileNetV2's
    19 feature blocks; a compact CNN's layers) are traced on ``sample``; among those returning a
    4-d map, the deepest whose shorter side is at least ``min_side`` is chosen, else the first
    (largest) map.

    Raises
    ------
    ValueError
        If no backbone block returns a 4-d feature map (not an image model).
    """
    import torch

    from shared.backbones.architectures import ImageNetInput, backbone_blocks

    blocks = [b for b in backbone_blocks(module.backbone) if not isinstance(b, ImageNetInput)]
    traced = [*blocks, *(child for block in blocks for child in block.children())]
    sides: dict[int, int | None] = {}

    def record(layer: nn.Module, _inputs: object, output: object) -> None:
        four_d = isinstance(output, torch.Tensor) and output.dim() == 4
        sides[id(layer)] = int(min(output.shape[-2:])) if four_d else None

    hooks = [layer.register_forward_hook(record) for layer in traced]
    try:
        with torch.no_grad():
            module.eval()
            module(sample[:1])
    finally:
        for hook in hooks:
            hook.remove()
    order: list[tuple[nn.Module, int]] = []
    for block in blocks:  # a block ending in pooling (a whole CNN) is looked into
        inner = [block] if sides.get(id(block)) is not None else list(block.children())
        order += [(layer, side) for layer in inner if (side := sides.get(id(layer))) is not None]
    if not order:
        raise ValueError("the model's backbone has no convolutional feature map: Grad-CAM needs an image model")
    wide = [layer for layer, side in order if side >= min_side]
    return wide[-1] if wide else order[0][0]


def gradcam_heatmaps(
    module: nn.Module,
    x: np.ndarray,
    *,
    target: int = POSITIVE,
    layer: nn.Module | None = None,
    advance: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Grad-CAM heatmaps of class ``target`` (Captum's ``LayerGradCam``), one per image, in ``[0, 1]``.

    Parameters
    ----------
    module : nn.Module
        The model (a :class:`~shared.backbones.architectures.BackboneWithHead` on raw pixels).
    x : np.ndarray
        Images as the model takes them, shape ``(n, H, W)``.
    target : int
        The class whose evidence is shown.
    layer : nn.Module, optional
        The layer (default :func:`cam_layer`).
    advance : Callable[[int], None], optional
        Called with the number of images done after each batch.

    Returns
    -------
    np.ndarray
        Shape ``(n, H, W)``, float32; each map divided by its maximum (all zeros where Grad-CAM
        finds no positive evidence), upsampled bilinearly to the image.
    """
    import torch
    from captum.attr import LayerAttribution, LayerGradCam

    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    module.eval()
    chosen = layer if layer is not None else cam_layer(module, inputs)
    cam = LayerGradCam(module, chosen)
    maps = []
    for start in range(0, len(inputs), CAM_BATCH):
        batch = inputs[start : start + CAM_BATCH]
        attribution = cam.attribute(batch, target=target, relu_attributions=True)
        upsampled = LayerAttribution.interpolate(attribution, tuple(batch.shape[-2:]), interpolate_mode="bilinear")
        heat = upsampled[:, 0].detach().clamp(min=0).numpy()
        peak = heat.reshape(len(heat), -1).max(axis=1)
        scale = np.where(peak > 0, peak, 1.0)
        maps.append((heat / scale[:, None, None]).astype(np.float32))
        if advance is not None:
            advance(len(batch))
    height, width = inputs.shape[-2:]
    return np.concatenate(maps) if maps else np.zeros((0, height, width), dtype=np.float32)


def overlay_png(image: np.ndarray, heatmap: np.ndarray, *, min_side: int = MIN_OVERLAY_SIDE, alpha: float = OVERLAY_ALPHA) -> bytes:
    """A grayscale image with its heatmap blended on top (matplotlib's ``jet``), as PNG bytes.

    Parameters
    ----------
    image : np.ndarray
        Pixels ``(H, W)`` in ``[0, 255]``.
    heatmap : np.ndarray
        ``(H, W)`` in ``[0, 1]``.
    min_side : int
        The PNG is scaled up (bilinear) until its shorter side is at least this.
    alpha : float
        Weight of the heatmap where it is 1 (it fades out where it is 0).
    """
    from matplotlib import colormaps
    from PIL import Image

    gray = np.clip(np.asarray(image, dtype=np.float32) / 255.0, 0.0, 1.0)
    heat = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    colored = colormaps["jet"](heat)[..., :3]
    weight = alpha * heat[..., None]
    blended = (1.0 - weight) * gray[..., None] + weight * colored
    picture = Image.fromarray((blended * 255.0).round().astype(np.uint8), mode="RGB")
    factor = max(1, -(-min_side // min(picture.size)))
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def integrated_gradients(
    module: nn.Module, x: np.ndarray, *, target: int = POSITIVE, steps: int = IG_STEPS
) -> tuple[np.ndarray, np.ndarray]:
    """Integrated Gradients (Captum) of the probability of class ``target``, from the all-zero input.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        Attributions ``(n, features)`` and each record's completeness gap: the attributions' sum
        minus (probability at the record - probability at the baseline), near 0.
    """
    import torch
    from captum.attr import IntegratedGradients

    module.eval()

    def probability(batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(module(batch), dim=1)[:, target]

    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    attributions, delta = IntegratedGradients(probability).attribute(
        inputs, baselines=torch.zeros_like(inputs), n_steps=steps, method="gausslegendre", return_convergence_delta=True
    )
    return attributions.detach().numpy(), delta.detach().numpy()


def attributions_csv(ids: Sequence[str], probs: np.ndarray, names: Sequence[str], attributions: np.ndarray) -> str:
    """CSV text: ``id``, ``probability``, then one ``attribution_<feature>`` column per feature."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "probability", *(f"attribution_{name}" for name in names)])
    for record, p, row in zip(ids, probs, attributions, strict=True):
        writer.writerow([record, repr(float(p)), *(repr(float(v)) for v in row)])
    return buffer.getvalue()


def attribution_bar_png(names: Sequence[str], attributions: np.ndarray, *, title: str = "") -> bytes:
    """Bar plot of each feature's mean absolute attribution (and mean signed one), as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    magnitude = np.abs(attributions).mean(axis=0)
    signed = attributions.mean(axis=0)
    order = np.argsort(magnitude)
    figure = Figure(figsize=(6.5, 0.35 * len(names) + 1.6), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    positions = np.arange(len(names))
    ax.barh(positions - 0.2, magnitude[order], height=0.4, color="tab:blue", label="mean |attribution|")
    ax.barh(positions + 0.2, signed[order], height=0.4, color="tab:orange", label="mean attribution (signed)")
    ax.set_yticks(positions, [names[i] for i in order])
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("Integrated Gradients: change in P(positive) from the average training record")
    ax.set_title(title or f"Feature attributions over {len(attributions)} records")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(True, axis="x", alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def feature_names(preprocessing: dict, width: int) -> list[str]:
    """The features' names from the site's preprocessing (``features``), else ``x0 .. x<width-1>``."""
    names = preprocessing.get("features")
    if isinstance(names, list) and len(names) == width:
        return [str(n) for n in names]
    return [f"x{i}" for i in range(width)]


def heatmap_file(record_id: str, taken: set[str]) -> str:
    """A PNG name for a record id: path separators as ``__``, other odd characters as ``_``, unique."""
    plain = re.sub(r"\.(png|jpe?g|tiff?|bmp|dcm|dicom)$", "", record_id, flags=re.IGNORECASE)
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", plain.replace("/", "__").replace("\\", "__")).strip(".") or "record"
    name, index = f"{stem}.png", 1
    while name in taken:
        index += 1
        name = f"{stem}-{index}.png"
    taken.add(name)
    return name


def explanation_files(
    model: TrainedModel, records: Records, probs: np.ndarray, *, advance: Callable[[int], None] | None = None
) -> dict[str, bytes]:
    """Every file of an ``--explain`` folder, rendered in memory.

    Images: one overlay PNG per record and ``heatmaps.csv`` (id, file, probability). Tabular:
    ``attributions.csv`` and ``attributions.png``.
    """
    if model.is_image:
        maps = gradcam_heatmaps(model.module, records.x, advance=advance)
        files: dict[str, bytes] = {}
        index = io.StringIO()
        writer = csv.writer(index, lineterminator="\n")
        writer.writerow(["id", "file", "probability"])
        taken: set[str] = set()
        for record, image, heat, p in zip(records.ids, records.x, maps, probs, strict=True):
            name = heatmap_file(record, taken)
            files[name] = overlay_png(image, heat)
            writer.writerow([record, name, repr(float(p))])
        files["heatmaps.csv"] = index.getvalue().encode("utf-8")
        return files
    attributions, _ = integrated_gradients(model.module, records.x)
    if advance is not None:
        advance(len(records.ids))
    names = feature_names(model.preprocessing, attributions.shape[1])
    return {
        "attributions.csv": attributions_csv(records.ids, probs, names, attributions).encode("utf-8"),
        "attributions.png": attribution_bar_png(names, attributions),
    }
