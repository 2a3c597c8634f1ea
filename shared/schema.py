"""Validation of CareFL's documents (run config, policy, ledger, audit, manifest, checkpoint).

Every document is a strict pydantic v2 model; :func:`validate` parses one and turns pydantic's
errors into one CareFL error that names the document, the key, the value and the rule, in the
words the command line has always used ("`num-rounds` must be >= 1, got 0.").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from shared.errors import CareFLError, ConfigError

M = TypeVar("M", bound=BaseModel)


def kebab(name: str) -> str:
    """Return the kebab-case spelling of a snake-case name (``num_rounds`` -> ``num-rounds``)."""
    return name.replace("_", "-")


class Document(BaseModel):
    """Base of CareFL's documents: strict types, unknown keys refused, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class KebabDocument(Document):
    """A document whose keys are spelled in kebab case (run config, policy)."""

    model_config = ConfigDict(
        strict=True, extra="forbid", frozen=True, alias_generator=kebab, populate_by_name=True
    )


def validate(
    model: type[M],
    data: Mapping[str, Any],
    *,
    source: str = "",
    error: type[CareFLError] = ConfigError,
    known: str = "",
) -> M:
    """Parse ``data`` as ``model``; raise ``error`` naming the first invalid key.

    Parameters
    ----------
    model : type[M]
        The pydantic model of the document.
    data : Mapping[str, Any]
        The document's content.
    source : str
        What the document is (a file's path, "run config"); prefixes the message.
    error : type[CareFLError]
        The error raised (``ConfigError`` for settings, ``InputError`` or ``IntegrityError``
        for files).
    known : str
        Listed after an unknown key ("known: ...").
    """
    try:
        return model.model_validate(dict(data))
    except ValidationError as err:
        raise error(describe(err, source=source, known=known)) from None


def describe(err: ValidationError, *, source: str = "", known: str = "") -> str:
    """One line for the first error of ``err``: key, rule and value."""
    first = err.errors(include_url=False)[0]
    key = ".".join(kebab(str(part)) for part in first["loc"]) or "document"
    value = first.get("input")
    ctx = first.get("ctx") or {}
    kind = first["type"]
    rules = {
        "greater_than_equal": lambda: f"must be >= {ctx.get('ge')}",
        "greater_than": lambda: f"must be > {ctx.get('gt')}",
        "less_than_equal": lambda: f"must be <= {ctx.get('le')}",
        "less_than": lambda: f"must be < {ctx.get('lt')}",
        "finite_number": lambda: "must be a finite number",
        "literal_error": lambda: f"must be one of {str(ctx.get('expected', '')).replace(chr(39), '')}",
        "missing": lambda: "is missing",
    }
    prefix = f"{source}: " if source else ""
    if kind == "extra_forbidden":
        listing = f"; known: {known}" if known else ""
        return f"{prefix}unknown key `{key}`{listing}."
    if kind in rules:
        rule = rules[kind]()
    elif kind.endswith("_type") or kind.endswith("_parsing"):
        rule = f"must be of type {kind.split('_')[0]}"
    else:
        rule = str(first["msg"]).removeprefix("Value error, ")
    got = "" if kind == "missing" else f", got {value!r}"
    return f"{prefix}`{key}` {rule}{got}."
