"""Client mod that receives the final global model at the end of a run and stores it at the site.

The server sends messages of type :data:`shared.protocol.MODEL_MESSAGE_TYPE` after the last
round: the ``carefl-model/1`` payload (the exchanged tensors; never the backbone, which the
site holds by SHA-256 in :class:`client.store.BackboneStore`), its SHA-256 and the model card.
The site

1. checks the payload against the SHA-256 of the message and the card's ``model_sha256``;
2. reads the study from the payload and checks it against its policy, as for every message on
   its data (:func:`client.policy.check_study`; a refusal becomes the ``SITE_REFUSED`` reply of
   :mod:`client.refusal_mod`);
3. for a transfer run, checks the payload's backbone is the study's and one it holds;
4. evaluates the final model on its own validation data, through the same code path as a round's
   evaluation (:class:`client.numpy_client.SiteClient`), and picks its operating point by the
   study's ``operating-point`` rule;
5. stores model, card and its own facts in ``models/<run-id>/`` (:mod:`client.models`),
   completely or not at all; for a study with ``standardize-features``, with the feature
   statistics its training rows give (``feature_stats.npz``: the very figures step 4 and every
   round standardized by, :attr:`shared.pipeline.LocalProblem.feature_stats`), so that the
   model can be applied to new images at the site.

A mismatch at 1, 3 or on the exchanged tensors' names is an
:class:`~shared.errors.IntegrityError`: the reply is an error (``MODEL_REFUSED``) and nothing is
stored. The reply to a stored model names the site and the model's SHA-256; the audit mod
records it (it is what leaves the site). Nothing of the site's evaluation, and none of its
feature statistics, leaves it.
Every other message passes through to the ClientApp unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from client.models import read_payload, store_site_model
from client.records import utc_now
from client.site import SiteEnvironment
from shared import protocol as wire
from shared.errors import CareFLError, InputError, IntegrityError, RefusalError
from shared.hashing import sha256_bytes
from shared.log import log

if TYPE_CHECKING:
    from shared.config import StudyConfig


def make_model_mod(environment_of: Callable[[Context], SiteEnvironment]) -> Mod:
    """Return a mod that verifies and stores the final model the server delivers.

    Parameters
    ----------
    environment_of : Callable[[Context], SiteEnvironment]
        Maps the node's context to the site's environment (data, site directory, policy).
    """

    def model_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if message.metadata.message_type != wire.MODEL_MESSAGE_TYPE:
            return call_next(message, context)
        env = environment_of(context)
        run_id = str(message.metadata.run_id)
        try:
            name, sha256 = receive_model(env, run_id, *_delivery(message))
        except RefusalError:
            raise  # the site's policy: refusal_mod answers SITE_REFUSED
        except CareFLError as err:
            reason = str(err)
            log(WARNING, "site %s refuses the final model of run %s: %s", env.site_dir.name, run_id, reason)
            return Message(Error(code=wire.MODEL_REFUSED, reason=reason), reply_to=message)
        record = ConfigRecord(
            {wire.MODEL_SHA256: sha256, wire.MODEL_STATUS: wire.STATUS_STORED, wire.MODEL_SITE: name}
        )
        return Message(RecordDict({wire.MODEL_RECORD: record}), reply_to=message)

    return model_mod


def _delivery(message: Message) -> tuple[bytes, str, str]:
    """The payload, the SHA-256 named and the card's text of a delivery."""
    try:
        record = message.content.config_records[wire.MODEL_RECORD]
        return bytes(record[wire.MODEL_PAYLOAD]), str(record[wire.MODEL_SHA256]), str(record[wire.MODEL_CARD])  # type: ignore[arg-type]
    except KeyError as err:
        raise InputError(f"the model delivery lacks {err}; refused, nothing stored.") from None


def receive_model(
    env: SiteEnvironment, run_id: str, model: bytes, named: str, card_text: str
) -> tuple[str, str]:
    """Verify a delivery, evaluate the model on the site's validation data, store it; returns (site, sha256).

    Parameters
    ----------
    env : SiteEnvironment
        The site's data, directory and policy.
    run_id : str
        The Flower run the model comes from (the model folder's name).
    model : bytes
        The ``carefl-model/1`` payload received.
    named : str
        The SHA-256 the delivery names.
    card_text : str
        The model card (JSON).

    Raises
    ------
    IntegrityError
        If the payload does not match its SHA-256 (message or card), names another backbone
        than the study's or one the site does not hold, or holds other tensors than the study
        exchanges.
    InputError
        If the payload or the card cannot be read.
    PolicyViolation
        If the site's policy refuses the study.
    """
    from client.numpy_client import SiteClient, clinical_metrics  # torch: only when a model arrives
    from client.site import site_data
    from shared.config import StudyConfig
    from shared.params import set_arrays
    from shared.tasks import input_spec
    from shared.training import predict_proba

    sha256 = sha256_bytes(model)
    card = _card(card_text)
    for what, expected in (("the delivery", named), ("the model card", card.get("model_sha256"))):
        if expected != sha256:
            raise IntegrityError(
                f"the model received has SHA-256 {sha256[:16]}..., but {what} names {str(expected)[:16]}...; "
                "refused, nothing stored."
            )
    payload = read_payload(model, origin="the model received from the server")
    try:
        cfg = StudyConfig.from_run_config(payload["config"])
    except KeyError as err:
        raise InputError(
            "the model received from the server names no study; refused, nothing stored."
        ) from err
    client = SiteClient(env, run_id)
    client._admit(cfg)
    backbone = _check_backbone(env, cfg, payload)
    site = site_data(cfg, env)
    problem = client._problem(cfg, site)
    state = payload.get("state_dict", {})
    if list(state) != problem.names:
        raise IntegrityError(
            f"the model received holds tensors {sorted(state)}, the study exchanges {problem.names}; refused."
        )
    set_arrays(problem.model, problem.names, [state[n].numpy() for n in problem.names])
    probs = predict_proba(problem.module, problem.x_val) if len(problem.y_val) else None
    scores = clinical_metrics(problem.y_val, probs, cfg.operating_point)
    preprocessing = dict(site.preprocessing)
    if "image_size" in input_spec(cfg):
        preprocessing.setdefault("image_size", cfg.image_size)
    facts: dict[str, Any] = {
        "format": "carefl-site-model/1",
        "site": problem.site_name,
        "run_id": run_id,
        "received_utc": utc_now().isoformat(timespec="seconds"),
        "model_sha256": sha256,
        "backbone_sha256": backbone,
        "study": cfg.to_run_config(),
        "operating_point": {
            "rule": cfg.operating_point,
            "threshold": float(scores[wire.METRIC_THRESHOLD]),
            "sensitivity": float(scores[wire.METRIC_SENSITIVITY_AT_OP]),
            "specificity": float(scores[wire.METRIC_SPECIFICITY_AT_OP]),
        },
        "at_0_5": {
            "sensitivity": float(scores[wire.METRIC_SENSITIVITY]),
            "specificity": float(scores[wire.METRIC_SPECIFICITY]),
        },
        "validation_records": int(len(problem.y_val)),
        "preprocessing": preprocessing,
    }
    folder = store_site_model(env.site_dir, run_id, model, card, facts, feature_stats=problem.feature_stats)
    log(
        INFO,
        "%s: final model of run %s stored in %s (sha256 %s...)",
        problem.site_name,
        run_id,
        folder,
        sha256[:16],
    )
    return problem.site_name, sha256


def _card(text: str) -> dict[str, Any]:
    try:
        card = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"the model card received is not JSON ({err}); refused, nothing stored.") from err
    if not isinstance(card, dict):
        raise InputError("the model card received is not a JSON object; refused, nothing stored.")
    return card


def _check_backbone(env: SiteEnvironment, cfg: StudyConfig, payload: dict[str, Any]) -> str | None:
    """The payload's backbone, checked to be the study's and held by the site (``None`` from scratch)."""
    from client.store import BackboneStore

    named = payload.get("backbone_sha256")
    if cfg.setup != "transfer":
        return None
    if not named or named != cfg.backbone_sha256:
        raise IntegrityError(
            f"the model received names backbone {str(named)[:16]}..., but its study pins "
            f"{cfg.backbone_sha256[:16] or 'none'}...; refused, nothing stored."
        )
    if not BackboneStore(env.site_dir).has(named):
        raise IntegrityError(
            f"the model received builds on backbone {named[:16]}..., which this site does not hold; "
            "refused, nothing stored."
        )
    return str(named)
