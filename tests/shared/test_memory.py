"""A run's memory is estimated before training; beyond what the machine has, it is refused.

The estimate runs the real backbone on one probe image and scales its layers' sizes to the
image side. Only the machine's free memory (psutil) is replaced where a test needs a small one.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from shared.backbones import BackboneRegistry
from shared.config import RunConfig, StudyConfig
from shared.errors import ConfigError
from shared.pipeline import GIB, Pretrained, build_model, check_memory, local_problem, memory_estimate
from shared.tasks.base import SiteData


@pytest.fixture(scope="module")
def mobilenet() -> Pretrained:
    resolved = BackboneRegistry(None, allow_download=False).resolve("mobilenet_v2-imagenet")
    return Pretrained(resolved.manifest, resolved.path)


def _study(image_size: int, **changes: object) -> StudyConfig:
    return RunConfig.of(task="chest-xray", backbone="mobilenet_v2-imagenet", image_size=image_size, **changes).study


def _site(n: int = 8) -> SiteData:
    x = np.full((n, 28, 28), 128.0, np.float32)
    y = (np.arange(n) % 2).astype(np.int64)
    return SiteData("site-1", x, y, x[:2], y[:2], "fingerprint")


def test_the_estimate_grows_with_the_square_of_the_image_side(mobilenet: Pretrained) -> None:
    # Prepare
    site = _site()

    # Execute
    small = memory_estimate(_study(64), build_model(_study(64), mobilenet), site)
    large = memory_estimate(_study(256), build_model(_study(256), mobilenet), site)

    # Assert: the feature batch dominates; 4x the side is about 16x the memory
    assert small.pass_name == large.pass_name == "features of 256 images at a time"
    assert 14 < large.total_bytes / small.total_bytes < 17


def test_an_image_size_beyond_the_machine_is_refused_naming_flag_estimate_and_limit(mobilenet: Pretrained) -> None:
    # Prepare: 10000 px, the case that died allocating 38 GB inside Ray
    cfg = _study(10_000)

    # Execute
    with pytest.raises(ConfigError) as info:
        check_memory(cfg, build_model(cfg, mobilenet), _site(), flag="--image-size", available=128 * GIB)

    # Assert
    message = str(info.value)
    assert message.startswith("--image-size 10000 needs about ")
    assert "GiB of memory at site site-1 (features of 256 images at a time at 10000x10000)" in message
    assert "more than the 128.0 GiB this machine has available; lower --image-size." in message


def test_the_default_image_size_fits_this_machine(mobilenet: Pretrained) -> None:
    # Execute / Assert: real free memory; the demo's 64 px needs well under 1 GiB
    estimate = check_memory(_study(64), build_model(_study(64), mobilenet), _site())
    assert estimate.total_bytes < GIB


def test_training_backbone_layers_counts_a_training_batch() -> None:
    # Prepare: from scratch every layer trains
    cfg = _study(512, setup="scratch", batch_size=64)

    # Execute
    estimate = memory_estimate(cfg, build_model(cfg, None), _site())

    # Assert
    assert estimate.pass_name in ("a training batch of 64 images", "evaluating 512 images at a time")


def test_a_site_refuses_before_computing_any_feature(mobilenet: Pretrained, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a machine with 100 MiB free (psutil is the collaborator replaced)
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=100 * 1024**2))
    cfg = _study(256)

    # Execute / Assert: on main the features were computed (or the process died trying)
    with pytest.raises(ConfigError, match=r"^image-size 256 needs about .* lower image-size\.$"):
        local_problem(cfg, build_model(cfg, mobilenet), _site(), backbone_sha256=mobilenet.manifest.sha256, cache_dir=None)
