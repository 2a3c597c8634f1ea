"""Tests of shared.config: defaults in sync with pyproject.toml, one owner per key, validation, coercion."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import pytest

from shared.config import PARTS, RunConfig, ServerSettings, SimulationSettings, StudyConfig, keys_of
from shared.errors import ConfigError

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


@pytest.fixture(scope="module")
def toml_defaults() -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of pyproject.toml."""
    with PYPROJECT.open("rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_equal_runconfig_defaults(toml_defaults: dict[str, Any]) -> None:
    # Prepare
    expected = RunConfig.of().to_run_config()

    # Execute
    mismatched = {
        key: (toml_defaults.get(key, "<absent>"), value)
        for key, value in expected.items()
        if key not in toml_defaults
        or toml_defaults[key] != value
        or type(toml_defaults[key]) is not type(value)
    }

    # Assert: same keys, same values, same types (5 and 5.0 are not the same default).
    assert sorted(toml_defaults) == sorted(expected)
    assert mismatched == {}


def test_pyproject_defaults_build_the_default_config(toml_defaults: dict[str, Any]) -> None:
    # Prepare / Execute
    cfg = RunConfig.from_run_config(toml_defaults)

    # Assert
    assert cfg == RunConfig.of()


def test_to_run_config_uses_kebab_case_keys_for_every_field() -> None:
    # Prepare
    names = [name for part in PARTS for name in part.model_fields]

    # Execute
    keys = list(RunConfig().to_run_config())

    # Assert
    assert keys == [n.replace("_", "-") for n in names]
    assert all("_" not in k for k in keys)


def test_every_key_has_exactly_one_owner() -> None:
    # Prepare
    declared = [key for part in PARTS for key in keys_of(part)]

    # Execute / Assert: no key is declared twice, and each part reads back only its own keys
    assert len(declared) == len(set(declared))
    cfg = RunConfig()
    assert set(cfg.study.to_run_config()) == set(keys_of(StudyConfig))
    assert set(cfg.server.model_dump(by_alias=True)) == set(keys_of(ServerSettings))
    assert set(cfg.simulation.model_dump(by_alias=True)) == set(keys_of(SimulationSettings))


@pytest.mark.parametrize("key", ["run-dir", "checkpoint-dir", "resume", "stage-timeout", "registry-dir", "data-path"])
def test_the_study_refuses_the_servers_and_the_simulations_keys(key: str) -> None:
    # Prepare: what a site would receive if the server leaked one of its own settings
    sent = {**RunConfig().study.to_run_config(), key: RunConfig().to_run_config()[key]}

    # Execute / Assert
    with pytest.raises(ConfigError, match=f"`{key}`"):
        StudyConfig.from_run_config(sent)


def test_flat_values_go_to_the_part_that_owns_them() -> None:
    # Prepare / Execute
    cfg = RunConfig.of(num_rounds=3, run_dir="runs/x", data_path="/d.npz")

    # Assert
    assert cfg.study.num_rounds == 3
    assert cfg.server.run_dir == "runs/x"
    assert cfg.simulation.data_path == "/d.npz"


@pytest.mark.parametrize(
    "cfg",
    [
        RunConfig.of(),
        RunConfig.of(
            task="chest-xray",
            setup="scratch",
            backbone="mobilenet_v2-imagenet",
            backbone_sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
            trainable="full",
            strategy="fedyogi",
            num_rounds=3,
            local_epochs=1,
            batch_size=8,
            learning_rate=0.001,
            proximal_mu=0.0,
            server_learning_rate=0.5,
            fraction_fit=0.5,
            fraction_evaluate=0.25,
            min_sites=1,
            seed=7,
            num_sites=10,
            dirichlet_alpha=0.3,
            image_size=96,
            val_fraction=0.1,
            data_path="/data/xray.npz",
            registry_dir="/srv/registry",
            backbone_weights="/srv/weights.pth",
            run_dir="runs/a",
        ),
    ],
    ids=["defaults", "every-field-changed"],
)
def test_from_run_config_round_trips(cfg: RunConfig) -> None:
    # Prepare
    run_config = cfg.to_run_config()

    # Execute
    back = RunConfig.from_run_config(run_config)

    # Assert
    assert back == cfg
    assert back.to_run_config() == run_config


def test_absent_keys_keep_defaults() -> None:
    # Prepare / Execute
    cfg = RunConfig.from_run_config({"num-rounds": 9})

    # Assert
    assert cfg == RunConfig.of(num_rounds=9)


def test_unknown_key_is_refused_by_name() -> None:
    # Prepare
    run_config = {"num-rounds": 3, "learning-rat": 0.1}

    # Execute
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config(run_config)

    # Assert
    assert "learning-rat" in str(info.value)
    assert "learning-rate" in str(info.value)  # the known keys are listed


def test_snake_case_key_is_refused() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ConfigError, match="num_rounds"):
        RunConfig.from_run_config({"num_rounds": 3})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("task", "x"),
        ("setup", "federated"),
        ("trainable", "half"),
        ("strategy", "sgd"),
        ("num-rounds", 0),
        ("local-epochs", 0),
        ("batch-size", -1),
        ("min-sites", 0),
        ("num-sites", 0),
        ("image-size", 4),
        ("learning-rate", 0),
        ("learning-rate", -0.1),
        ("learning-rate", math.nan),
        ("server-learning-rate", 0.0),
        ("dirichlet-alpha", 0.0),
        ("proximal-mu", -0.01),
        ("fraction-fit", 1.5),
        ("fraction-fit", 0.0),
        ("fraction-evaluate", 1.01),
        ("val-fraction", 1.0),
        ("val-fraction", 0.0),
        ("backbone-sha256", "abc"),
    ],
)
def test_invalid_value_is_refused_naming_the_key(key: str, value: Any) -> None:
    # Prepare
    run_config = {key: value}

    # Execute
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config(run_config)

    # Assert
    assert f"`{key}`" in str(info.value)


def test_with_overrides_validates() -> None:
    # Prepare
    cfg = RunConfig.of()

    # Execute / Assert
    with pytest.raises(ConfigError, match="`num-rounds`"):
        cfg.with_overrides(num_rounds=0)
    assert cfg.with_overrides(num_rounds=2).study.num_rounds == 2


@pytest.mark.parametrize(
    ("key", "value"),
    [("learning-rate", 1), ("server-learning-rate", 2), ("fraction-fit", 1), ("proximal-mu", 0)],
)
def test_int_for_float_key_is_accepted_as_float(key: str, value: int) -> None:
    # Prepare
    run_config = {key: value}

    # Execute
    cfg = RunConfig.from_run_config(run_config)

    # Assert
    stored = cfg.to_run_config()[key]
    assert type(stored) is float
    assert stored == float(value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num-rounds", "5"),
        ("num-rounds", 5.0),
        ("num-rounds", True),
        ("seed", "42"),
        ("learning-rate", "0.05"),
        ("learning-rate", True),
        ("task", 1),
    ],
)
def test_wrong_type_is_refused_naming_the_key(key: str, value: Any) -> None:
    # Prepare
    run_config = {key: value}

    # Execute
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config(run_config)

    # Assert
    assert f"`{key}`" in str(info.value)


@pytest.mark.parametrize("digest", ["z" * 64, "B" * 64], ids=["non-hex", "uppercase"])
def test_backbone_sha256_must_be_lowercase_hex(digest: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ConfigError, match="`backbone-sha256`"):
        RunConfig.from_run_config({"backbone-sha256": digest})


@pytest.mark.parametrize(
    ("key", "value"),
    [("proximal-mu", math.nan), ("learning-rate", math.inf), ("dirichlet-alpha", math.inf)],
)
def test_non_finite_hyperparameter_is_refused(key: str, value: float) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ConfigError, match=f"`{key}`"):
        RunConfig.from_run_config({key: value})


@pytest.mark.parametrize("rule", ["youden", "sensitivity:0.95", "0.3"])
def test_operating_point_accepts_its_rules(rule: str) -> None:
    # Execute / Assert
    assert StudyConfig.from_run_config({"operating-point": rule}).operating_point == rule


def test_operating_point_refusal_names_the_key() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"`operating-point` must be .*youden.*got 'sensitivity:1.5'"):
        StudyConfig.from_run_config({"operating-point": "sensitivity:1.5"})
