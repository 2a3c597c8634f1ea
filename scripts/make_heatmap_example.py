"""Make docs/heatmap.png: a real PneumoniaMNIST X-ray beside its Grad-CAM overlay, as `carefl predict --explain` draws it.

A linear head is trained on ImageNet MobileNetV2 features (64 px, the default image size) of
PneumoniaMNIST training images; the first validation image with pneumonia that the model calls
positive is explained with :func:`client.explain.gradcam_heatmaps` and drawn with
:func:`client.explain.overlay_png`. Also printed: the rank correlation of that image's map with
the map of the same model whose head is re-drawn at random (Adebayo et al., 2018).

Usage::

    .venv/bin/python scripts/make_heatmap_example.py [--data ../shared/data/pneumoniamnist.npz] [--out docs/heatmap.png]
"""

from __future__ import annotations

import argparse
import copy
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.stats import spearmanr

from client.explain import gradcam_heatmaps, overlay_png
from shared.atomic import atomic_write_bytes
from shared.backbones.registry import BackboneRegistry
from shared.config import StudyConfig
from shared.pipeline import Pretrained, build_model
from shared.scores import binary_metrics
from shared.training import TrainSettings, predict_proba, train

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    """Train, explain one image, write the PNG."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "pneumoniamnist.npz")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "heatmap.png")
    parser.add_argument("--train-images", type=int, default=1500)
    args = parser.parse_args()

    resolved = BackboneRegistry(allow_download=False).resolve("mobilenet_v2-imagenet")
    study = StudyConfig(task="chest-xray", backbone="mobilenet_v2-imagenet", image_size=64)
    model = build_model(study, Pretrained(resolved.manifest, resolved.path))
    with np.load(args.data) as arrays:
        x = arrays["train_images"][: args.train_images].astype(np.float32)
        y = arrays["train_labels"][: args.train_images].ravel().astype(np.int64)
        x_val = arrays["val_images"][:200].astype(np.float32)
        y_val = arrays["val_labels"][:200].ravel().astype(np.int64)
    with torch.no_grad():
        features = model.backbone(torch.from_numpy(x)).numpy()
    train(model.head, features, y, TrainSettings(epochs=20, batch_size=64, learning_rate=0.05, seed=1))
    probs = predict_proba(model, x_val)[:, 1]
    scores = binary_metrics(y_val, probs)
    print(f"head on {len(y)} images: validation AUC {scores.auc:.3f}, accuracy {scores.accuracy:.3f}")
    index = int(np.flatnonzero((y_val == 1) & (probs >= 0.5))[0])
    image = x_val[index : index + 1]
    heat = gradcam_heatmaps(model, image)[0]
    randomized = copy.deepcopy(model)
    torch.manual_seed(0)
    torch.nn.init.normal_(randomized.head.weight, std=float(model.head.weight.detach().std()))
    rho = spearmanr(heat.ravel(), gradcam_heatmaps(randomized, image)[0].ravel()).statistic
    print(f"val image {index}: P(pneumonia) {probs[index]:.3f}; rank correlation with a random head's map {rho:.2f}")

    overlay = Image.open(io.BytesIO(overlay_png(image[0], heat)))
    original = Image.fromarray(image[0].astype(np.uint8)).convert("RGB").resize(overlay.size, Image.Resampling.BILINEAR)
    both = Image.new("RGB", (overlay.width * 2 + 8, overlay.height), "white")
    both.paste(original, (0, 0))
    both.paste(overlay, (overlay.width + 8, 0))
    buffer = io.BytesIO()
    both.save(buffer, format="PNG", optimize=True)
    atomic_write_bytes(args.out, buffer.getvalue())
    print(f"wrote {args.out} ({len(buffer.getvalue()) // 1024} KB)")


if __name__ == "__main__":
    main()
