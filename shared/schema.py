"""Validation of CareFL's documents (run config, policy, ledger, audit, manifest, checkpoint).

Every document is a strict pydantic v2 model; :func:`validate` parses one and turns pydantic's
errors into one CareFL error that names the document, the key, the value and the rule, in the
words the command line has always used ("`num-rounds` must be >= 1, got 0.").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, ClassVar, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from shared.errors import CareFLError, ConfigError, InputError

M = TypeVar("M", bound="Document")

Known = str | Mapping[str, str]
"""Listed after an unknown key: one listing, or one per table (``""`` for the top level)."""


def kebab(name: str) -> str:
    """Return the kebab-case spelling of a snake-case name (``num_rounds`` -> ``num-rounds``)."""
    return name.replace("_", "-")


def _full_sha256(value: str) -> str:
    if not (len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise ValueError("must be 64 lowercase hex digits (a full SHA-256)")
    return value


Sha256 = Annotated[str, AfterValidator(_full_sha256)]
"""A full SHA-256 in lowercase hex."""

Sha256OrEmpty = Annotated[str, AfterValidator(lambda value: _full_sha256(value) if value else value)]
"""A full SHA-256 in lowercase hex, or ``""`` (none pinned)."""


class Document(BaseModel):
    """Base of CareFL's documents: strict types, unknown keys refused, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    @classmethod
    def key_of(cls, name: str) -> str:
        """How messages spell the key of field ``name``: as the document writes it."""
        return name


class KebabDocument(Document):
    """A document whose keys are spelled in kebab case (the run config)."""

    model_config = ConfigDict(
        strict=True, extra="forbid", frozen=True, alias_generator=kebab, populate_by_name=True
    )

    @classmethod
    def key_of(cls, name: str) -> str:
        """How messages spell the key of field ``name``: in kebab case."""
        return kebab(name)


class BuiltDocument(Document):
    """A document that code builds too: invalid arguments raise :attr:`refusal`, not pydantic's error.

    Parsed by :func:`validate`, it is refused as any document is, naming its source.
    """

    refusal: ClassVar[type[CareFLError]] = InputError
    """The error an invalid argument raises."""
    subject: ClassVar[str] = ""
    """What the document is, prefixed to the message ("backbone manifest")."""

    @model_validator(mode="wrap")
    @classmethod
    def _refused_as(cls, data: Any, handler: ModelWrapValidatorHandler[Self], info: ValidationInfo) -> Self:
        if info.context is not None:  # parsed by validate(), which reports the error
            return handler(data)
        try:
            return handler(data)
        except ValidationError as err:
            known = ", ".join(cls.key_of(name) for name in cls.model_fields)
            raise cls.refusal(describe(err, source=cls.subject, known=known, spell=cls.key_of)) from None


def validate(
    model: type[M],
    data: object,
    *,
    source: str = "",
    error: type[CareFLError] = ConfigError,
    known: Known = "",
) -> M:
    """Parse ``data`` as ``model``; raise ``error`` naming the first invalid key.

    Parameters
    ----------
    model : type[M]
        The pydantic model of the document.
    data : object
        The document's content: a mapping (anything else is refused with ``error``).
    source : str
        What the document is (a file's path, "run config"); prefixes the message.
    error : type[CareFLError]
        The error raised (``ConfigError`` for settings, ``InputError`` or ``IntegrityError``
        for files).
    known : str | Mapping[str, str]
        Listed after an unknown key ("known: ..."); a mapping lists the keys of each table.
    """
    try:
        content = dict(data) if isinstance(data, Mapping) else data
        return model.model_validate(content, context={"source": source})
    except ValidationError as err:
        raise error(describe(err, source=source, known=known, spell=model.key_of)) from None


def describe(
    err: ValidationError, *, source: str = "", known: Known = "", spell: Callable[[str], str] = kebab
) -> str:
    """One line for the first error of ``err``: source, key, rule and value.

    ``spell`` writes a field's key as the document does (``Model.key_of``; kebab case by
    default).
    """
    prefix = f"{source}: " if source else ""
    return f"{prefix}{problem(err, known=known, spell=spell)}."


def problem(err: ValidationError, *, known: Known = "", spell: Callable[[str], str] = kebab) -> str:
    """The first error of ``err`` as "`key` rule, got value", to embed in a sentence."""
    first = err.errors(include_url=False)[0]
    loc = first["loc"]
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
        "model_type": lambda: "must be a table of keys and values",
        "dict_type": lambda: "must be a table of keys and values",
        "tuple_type": lambda: "must be of type list",
        "json_invalid": lambda: f"is not valid JSON ({ctx.get('error')})",
    }
    where = _where(loc, spell)
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        listing = known if isinstance(known, str) else known.get(_path(loc[:-1], spell), "")
        return f"unknown key {where}" + (f"; known: {listing}" if listing else "")
    if kind in rules:
        rule = rules[kind]()
    elif kind.endswith("_type") or kind.endswith("_parsing"):
        rule = f"must be of type {kind.split('_')[0]}"
    else:
        rule = str(first["msg"]).removeprefix("Value error, ")
    got = "" if kind in ("missing", "json_invalid") else f", got {value!r}"
    return f"{where} {rule}{got}"


def _path(loc: Sequence[int | str], spell: Callable[[str], str]) -> str:
    """The dotted keys of ``loc`` (list positions left out)."""
    return ".".join(spell(part) for part in loc if isinstance(part, str))


def _where(loc: Sequence[int | str], spell: Callable[[str], str]) -> str:
    """"`table.key`"; a position in a list adds " item i", a wrong key of a mapping " key"."""
    words: list[str] = []
    keys: list[str] = []
    for part in loc:
        if part == "[key]":
            keys.pop()  # the wrong key itself: it is the value reported
            words.append(_labelled(keys, "key"))
            keys = []
        elif isinstance(part, int):
            words.append(_labelled(keys, f"item {part}"))
            keys = []
        else:
            keys.append(spell(part))
    if keys or not words:
        words.append(f"`{'.'.join(keys) or 'document'}`")
    return " ".join(words)


def _labelled(keys: list[str], label: str) -> str:
    return f"`{'.'.join(keys)}` {label}" if keys else label
