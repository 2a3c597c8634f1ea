"""The demo's simulated hospitals accept the demo's own request (``--epsilon``, ``--dp``, ``--rounds``)."""

from __future__ import annotations

import pytest

from client.policy import PolicyViolation, SitePolicy
from client.privacy import check_request
from server.local.demo import demo_config, demo_policy

SIZES = [36]  # training records of the heart-disease demo's smallest hospital (Switzerland)


@pytest.mark.parametrize("epsilon", [8.0, 40.0])
def test_every_site_accepts_the_demos_epsilon(epsilon: float) -> None:
    # Prepare
    study = demo_config("heart-disease", target_epsilon=epsilon, num_rounds=1, local_epochs=1).study

    # Execute
    policy = demo_policy(study, SIZES)

    # Assert: the request passes the real policy check at every site; the default policy (epsilon
    # 3 per run) refuses it
    for size in SIZES:
        check_request(study, policy, num_records=size, backbone_sha256="")
    with pytest.raises(PolicyViolation, match="max_epsilon_per_run"):
        check_request(study, SitePolicy(), num_records=SIZES[0], backbone_sha256="")
    assert policy.require_dp and policy.max_epsilon_per_run == max(3.0, epsilon)
    assert policy.max_lifetime_epsilon >= policy.max_epsilon_per_run


def test_default_request_keeps_the_default_policy() -> None:
    # Prepare
    study = demo_config("heart-disease", num_rounds=1, local_epochs=1).study

    # Execute / Assert: at epsilon 3 every cap and the noise floor stay the defaults
    assert demo_policy(study, SIZES) == SitePolicy()


def test_no_dp_and_many_rounds_are_accepted() -> None:
    # Prepare
    study = demo_config("heart-disease", dp=False, num_rounds=150).study

    # Execute
    policy = demo_policy(study, SIZES)

    # Assert
    assert not policy.require_dp and policy.max_rounds == 150
    for size in SIZES:
        check_request(study, policy, num_records=size, backbone_sha256="")
