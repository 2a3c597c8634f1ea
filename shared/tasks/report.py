"""What a hospital learns about its data before it joins: the data report of ``carefl data check``.

Each task's reader fills one :class:`DataReport` while it reads a site's own data; the report
holds counts and summaries only (never a file's identifying tags or a patient id), so it can be
printed, written as JSON and logged.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

MAX_LISTED_REFUSALS = 20
"""Refused files listed by name in a report; the rest are counted."""


@dataclass(frozen=True)
class Refusal:
    """One record (file or row) left out, and why.

    Attributes
    ----------
    where : str
        The file (relative to the data path) or ``file, line N``.
    reason : str
        Why, in one phrase (e.g. ``"multi-frame DICOM (12 frames)"``).
    """

    where: str
    reason: str


@dataclass
class DataReport:
    """A site's data, summarized.

    Attributes
    ----------
    task : str
        The task the data were read for.
    path : str
        The data path.
    layout : str
        How the data were laid out (``"class folders"``, ``"manifest"``, ``"npz"``, ``"csv"``).
    records : int
        Records read and usable.
    per_class : dict[str, int]
        Usable records per class name.
    formats : Counter
        Usable records per file format (``PNG``, ``DICOM``, ``CSV`` ...).
    image_sizes : Counter
        Usable images per original size ``"WxH"``.
    bit_depths : Counter
        Usable images per stored bit depth.
    dicom : dict[str, Counter]
        DICOM summaries: ``modality``, ``photometric``, ``transfer_syntax`` value counts.
    refused : list[Refusal]
        Records left out, in reading order.
    missing : dict[str, int]
        Missing values per column (tabular data).
    imputed : dict[str, int]
        Values filled in per column (``missing = "impute"``).
    dropped : int
        Rows left out for a missing value (``missing = "drop"``).
    patients : int
        Distinct patients (0 when the data have no patient column).
    split : dict[str, Any]
        The training/validation split the site would train with: counts per class on each side,
        whether it is by patient and stratified.
    problem : str
        Why the data cannot be used ("" when they can).
    """

    task: str
    path: str
    layout: str = ""
    records: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    formats: Counter[str] = field(default_factory=Counter)
    image_sizes: Counter[str] = field(default_factory=Counter)
    bit_depths: Counter[str] = field(default_factory=Counter)
    dicom: dict[str, Counter[str]] = field(default_factory=dict)
    refused: list[Refusal] = field(default_factory=list)
    missing: dict[str, int] = field(default_factory=dict)
    imputed: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    patients: int = 0
    split: dict[str, Any] = field(default_factory=dict)
    problem: str = ""

    @property
    def usable(self) -> bool:
        """Whether a site could train on these data."""
        return not self.problem

    def refuse(self, where: str, reason: str) -> None:
        """Record that ``where`` was left out because of ``reason``."""
        self.refused.append(Refusal(where, reason))

    def imbalance(self) -> float:
        """Records of the largest class per record of the smallest (``inf`` if a class has none)."""
        counts = [n for n in self.per_class.values()]
        if not counts:
            return float("nan")
        return float("inf") if min(counts) == 0 else max(counts) / min(counts)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready values (refusals: the first :data:`MAX_LISTED_REFUSALS`, then a count)."""
        document = asdict(self)
        document["refused"] = [asdict(r) for r in self.refused[:MAX_LISTED_REFUSALS]]
        document["refused_count"] = len(self.refused)
        document["usable"] = self.usable
        document["imbalance"] = self.imbalance()
        for key in ("formats", "image_sizes", "bit_depths"):
            document[key] = dict(getattr(self, key))
        document["dicom"] = {key: dict(value) for key, value in self.dicom.items()}
        return document
