"""Tests of client.policy: the site's policy file, and the checks the server cannot override."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from client.policy import PolicyViolation, RunRequest, SitePolicy, check_round, check_run
from shared.errors import CareFLError, InputError

SHA_A = "a" * 64
SHA_B = "0123456789abcdef" * 4

FULL_EXAMPLE = f"""
[privacy]
require_dp = false
max_epsilon_per_run = 2          # an integer is accepted for a float
max_lifetime_epsilon = 8.5
max_delta = 1e-5
min_noise_multiplier = 0.8
max_rounds = 20

[studies]
allowed_tasks = ["chest-xray"]
allowed_backbones = ["{SHA_A}", "{SHA_B}"]
"""

# A request every default policy accepts; each case below changes one thing.
GOOD = RunRequest(
    task="heart-disease",
    backbone_sha256=SHA_A,
    dp=True,
    target_epsilon=1.0,
    delta=1e-5,
    noise_multiplier=1.0,
    rounds=10,
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site-policy.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_valid_and_documented_values() -> None:
    # Prepare / Execute
    policy = SitePolicy()

    # Assert
    assert policy.require_dp is True
    assert (policy.max_epsilon_per_run, policy.max_lifetime_epsilon) == (3.0, 10.0)
    assert (policy.max_delta, policy.min_noise_multiplier, policy.max_rounds) == (1e-3, 0.3, 100)
    assert policy.allowed_tasks == ("heart-disease", "chest-xray")
    assert policy.allowed_backbones == ()
    check_run(policy, GOOD)


def test_full_example_loads(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path, FULL_EXAMPLE)

    # Execute
    policy = SitePolicy.load(path)

    # Assert
    assert policy == SitePolicy(
        require_dp=False,
        max_epsilon_per_run=2.0,
        max_lifetime_epsilon=8.5,
        max_delta=1e-5,
        min_noise_multiplier=0.8,
        max_rounds=20,
        allowed_tasks=("chest-xray",),
        allowed_backbones=(SHA_A, SHA_B),
    )
    assert isinstance(policy.max_epsilon_per_run, float)


def test_absent_keys_keep_defaults(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path, "[privacy]\nmax_rounds = 7\n")

    # Execute
    policy = SitePolicy.load(path)

    # Assert
    assert policy == SitePolicy(max_rounds=7)
    assert SitePolicy.load(_write(tmp_path, "")) == SitePolicy()


@pytest.mark.parametrize(
    "policy",
    [
        SitePolicy(),
        SitePolicy(
            require_dp=False,
            max_epsilon_per_run=0.1,
            max_lifetime_epsilon=1e6,
            max_delta=1e-05,
            min_noise_multiplier=2.5,
            max_rounds=1,
            allowed_tasks=("chest-xray",),
            allowed_backbones=(SHA_B, SHA_A),
        ),
    ],
    ids=["defaults", "every-value-changed"],
)
def test_to_toml_round_trip(tmp_path: Path, policy: SitePolicy) -> None:
    # Prepare
    path = _write(tmp_path, policy.to_toml())

    # Execute
    loaded = SitePolicy.load(path)

    # Assert
    assert loaded == policy


def test_every_field_has_a_place_in_the_file() -> None:
    # Prepare
    text = SitePolicy().to_toml()

    # Execute
    written = {line.split(" = ")[0] for line in text.splitlines() if " = " in line}

    # Assert
    assert written == set(SitePolicy.model_fields)


VIOLATIONS: list[tuple[str, SitePolicy, dict[str, Any], object, object]] = [
    # rule, policy, change to GOOD, requested, limit
    (
        "allowed_tasks",
        SitePolicy(allowed_tasks=("chest-xray",)),
        {},
        "heart-disease",
        ("chest-xray",),
    ),
    (
        "allowed_backbones",
        SitePolicy(allowed_backbones=(SHA_B,)),
        {},
        SHA_A,
        (SHA_B,),
    ),
    (
        "allowed_backbones",
        SitePolicy(allowed_backbones=(SHA_A,)),
        {"backbone_sha256": ""},
        "",
        (SHA_A,),
    ),
    ("require_dp", SitePolicy(), {"dp": False}, False, True),
    ("max_rounds", SitePolicy(), {"rounds": 101}, 101, 100),
    ("max_delta", SitePolicy(), {"delta": 2e-3}, 2e-3, 1e-3),
    ("max_epsilon_per_run", SitePolicy(), {"target_epsilon": 3.5}, 3.5, 3.0),
    ("max_epsilon_per_run", SitePolicy(), {"target_epsilon": float("nan")}, float("nan"), 3.0),
    ("min_noise_multiplier", SitePolicy(), {"noise_multiplier": 0.29}, 0.29, 0.3),
]


@pytest.mark.parametrize(
    ("rule", "policy", "change", "requested", "limit"),
    VIOLATIONS,
    ids=[
        "task",
        "backbone",
        "scratch-while-backbones-listed",
        "dp-off",
        "rounds",
        "delta",
        "epsilon",
        "epsilon-nan",
        "noise",
    ],
)
def test_each_rule_broken_alone_is_refused(
    rule: str, policy: SitePolicy, change: dict[str, Any], requested: object, limit: object
) -> None:
    # Prepare
    request = dataclasses.replace(GOOD, **change)

    # Execute
    with pytest.raises(PolicyViolation) as caught:
        check_run(policy, request)

    # Assert
    violation = caught.value
    assert isinstance(violation, CareFLError)
    assert violation.rule == rule
    assert violation.limit == limit
    assert str(violation).startswith(
        f"site policy refuses the run: {rule}: requested {requested}, limit {limit}; "
    )
    if requested == requested:  # NaN compares unequal to itself
        assert violation.requested == requested


def test_first_broken_rule_is_reported() -> None:
    # Prepare: breaks require_dp, max_rounds, and (were DP on) every privacy limit
    request = dataclasses.replace(GOOD, dp=False, rounds=1000, target_epsilon=50.0)
    outside = dataclasses.replace(GOOD, task="chest-xray", rounds=1000, delta=0.5)

    # Execute
    with pytest.raises(PolicyViolation) as dp_first:
        check_run(SitePolicy(), request)
    with pytest.raises(PolicyViolation) as task_first:
        check_run(SitePolicy(allowed_tasks=("heart-disease",)), outside)
    with pytest.raises(PolicyViolation) as delta_before_epsilon:
        check_run(SitePolicy(), dataclasses.replace(GOOD, delta=0.5, target_epsilon=9.0))

    # Assert
    assert dp_first.value.rule == "require_dp"
    assert task_first.value.rule == "allowed_tasks"
    assert delta_before_epsilon.value.rule == "max_delta"


def test_dp_off_where_not_required_skips_privacy_limits() -> None:
    # Prepare
    policy = SitePolicy(require_dp=False)
    request = dataclasses.replace(
        GOOD, dp=False, target_epsilon=0.0, delta=0.0, noise_multiplier=0.0, backbone_sha256=""
    )

    # Execute / Assert: no exception
    check_run(policy, request)


def test_dp_off_where_not_required_still_checks_rounds() -> None:
    # Prepare
    request = dataclasses.replace(GOOD, dp=False, rounds=101)

    # Execute
    with pytest.raises(PolicyViolation) as caught:
        check_run(SitePolicy(require_dp=False), request)

    # Assert
    assert caught.value.rule == "max_rounds"


def test_request_exactly_at_limits_passes() -> None:
    # Prepare
    policy = SitePolicy(allowed_backbones=(SHA_A,))
    request = dataclasses.replace(GOOD, target_epsilon=3.0, delta=1e-3, noise_multiplier=0.3, rounds=100)

    # Execute / Assert: no exception
    check_run(policy, request)


@pytest.mark.parametrize(
    ("run_after", "lifetime_after", "rule", "requested", "limit"),
    [
        (3.01, 5.0, "max_epsilon_per_run", 3.01, 3.0),
        (1.0, 10.5, "max_lifetime_epsilon", 10.5, 10.0),
        (3.5, 10.5, "max_epsilon_per_run", 3.5, 3.0),
        (float("inf"), 1.0, "max_epsilon_per_run", float("inf"), 3.0),
    ],
    ids=["run", "lifetime", "both-run-first", "infinite"],
)
def test_check_round_refuses_overspend(
    run_after: float, lifetime_after: float, rule: str, requested: float, limit: float
) -> None:
    # Prepare
    policy = SitePolicy()

    # Execute
    with pytest.raises(PolicyViolation) as caught:
        check_round(policy, run_epsilon_after=run_after, lifetime_epsilon_after=lifetime_after)

    # Assert
    assert (caught.value.rule, caught.value.requested, caught.value.limit) == (rule, requested, limit)
    assert f"{rule}: requested {requested}, limit {limit}" in str(caught.value)


def test_check_round_refuses_nan_spend() -> None:
    # Prepare
    policy = SitePolicy()

    # Execute
    with pytest.raises(PolicyViolation) as caught:
        check_round(policy, run_epsilon_after=1.0, lifetime_epsilon_after=float("nan"))

    # Assert
    assert caught.value.rule == "max_lifetime_epsilon"


@pytest.mark.parametrize(
    ("run_after", "lifetime_after"),
    [(3.0, 10.0), (3.0 + 1e-10, 10.0 + 1e-10), (0.0, 0.0)],
    ids=["at-limit", "float-noise", "nothing-spent"],
)
def test_check_round_at_limit_passes(run_after: float, lifetime_after: float) -> None:
    # Prepare
    policy = SitePolicy()

    # Execute / Assert: no exception
    check_round(policy, run_epsilon_after=run_after, lifetime_epsilon_after=lifetime_after)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"max_epsilon_per_run": 0.0}, "privacy.max_epsilon_per_run"),
        ({"max_epsilon_per_run": float("inf")}, "privacy.max_epsilon_per_run"),
        ({"min_noise_multiplier": -1.0}, "privacy.min_noise_multiplier"),
        ({"max_delta": 1.0}, "privacy.max_delta"),
        ({"max_delta": 0.0}, "privacy.max_delta"),
        ({"max_lifetime_epsilon": 2.0}, "privacy.max_lifetime_epsilon"),
        ({"max_rounds": 0}, "privacy.max_rounds"),
        ({"max_rounds": True}, "privacy.max_rounds"),
        ({"require_dp": 1}, "privacy.require_dp"),
        ({"allowed_tasks": ()}, "studies.allowed_tasks"),
        ({"allowed_tasks": ("mri",)}, "studies.allowed_tasks"),
        ({"allowed_backbones": ("A" * 64,)}, "studies.allowed_backbones"),
        ({"allowed_backbones": ("abc",)}, "studies.allowed_backbones"),
    ],
)
def test_invalid_policy_values_name_the_key(changes: dict[str, Any], key: str) -> None:
    # Execute
    with pytest.raises(InputError) as caught:
        SitePolicy(**changes)

    # Assert
    assert f"`{key}`" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[privacy]\nmax_epsilon_per_run = 'three'\n", "privacy.max_epsilon_per_run"),
        ("[privacy]\nmax_rounds = 10.0\n", "privacy.max_rounds"),
        ("[privacy]\nmax_rounds = true\n", "privacy.max_rounds"),
        ("[privacy]\nmax_delta = true\n", "privacy.max_delta"),
        ("[privacy]\nrequire_dp = 'yes'\n", "privacy.require_dp"),
        ("[privacy]\nmax_delta = 2.0\n", "privacy.max_delta"),
        ("[privacy]\nmax_epsilon_per_run = nan\n", "privacy.max_epsilon_per_run"),
        ("[privacy]\nmax_epsilon_per_run = 20\n", "privacy.max_lifetime_epsilon"),
        ("[privacy]\nmax_epsilons = 1.0\n", "privacy.max_epsilons"),
        ("[privacy]\nallowed_tasks = ['chest-xray']\n", "privacy.allowed_tasks"),
        ("[studies]\nallowed_tasks = 'chest-xray'\n", "studies.allowed_tasks"),
        ("[studies]\nallowed_tasks = ['chest-xray', 3]\n", "studies.allowed_tasks"),
        ("[studies]\nallowed_backbones = ['not-a-hash']\n", "studies.allowed_backbones"),
        ("[network]\nport = 1\n", "network"),
        ("require_dp = false\n", "require_dp"),
        ("privacy = 3\n", "privacy"),
    ],
)
def test_load_refuses_bad_content_naming_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    # Prepare
    path = _write(tmp_path, text)

    # Execute
    with pytest.raises(InputError) as caught:
        SitePolicy.load(path)

    # Assert
    message = str(caught.value)
    assert str(path) in message
    assert f"`{key}`" in message


@pytest.mark.parametrize(
    "make",
    [
        lambda tmp: tmp / "absent.toml",
        lambda tmp: tmp,
        lambda tmp: _write(tmp, "[privacy\nrequire_dp = true\n"),
        lambda tmp: _write(tmp, "[privacy]\nrequire_dp = true\nrequire_dp = false\n"),
    ],
    ids=["missing", "directory", "bad-toml", "duplicate-key"],
)
def test_load_refuses_unreadable_file_naming_it(tmp_path: Path, make: Any) -> None:
    # Prepare
    path = make(tmp_path)

    # Execute
    with pytest.raises(InputError) as caught:
        SitePolicy.load(path)

    # Assert
    assert str(path) in str(caught.value)


def test_load_refuses_non_utf8_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "site-policy.toml"
    path.write_bytes(b"[privacy]\n# \xff\xfe\n")

    # Execute
    with pytest.raises(InputError) as caught:
        SitePolicy.load(path)

    # Assert
    assert str(path) in str(caught.value)
