"""Patient-level train / validation / test split, and the check that no patient leaks across sets.

Why by patient: two studies of one patient share anatomy (and in real data, often the finding), so an image
split lets the model recognise the patient instead of the finding and inflates every held-out metric. All
records of a patient go to one set. Stratification is on the patient's maximum label (a patient is positive
if any record is), so rare findings still reach the validation and test sets.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from training.data.records import LabelError, Record

__all__ = ["Split", "check_no_leakage", "patient_split"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Records of the three sets, each in the order of the input list."""

    train: list[Record]
    val: list[Record]
    test: list[Record]

    def sets(self) -> dict[str, list[Record]]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def summary(self, label: str | None = None) -> dict[str, dict[str, int]]:
        """Records, patients (and positives for ``label``) per set; safe to log (no identifiers)."""
        out = {}
        for name, records in self.sets().items():
            row = {"records": len(records), "patients": len({r.patient_id for r in records})}
            if label is not None:
                row["positive_records"] = sum(int(r.labels.get(label, 0)) for r in records)
            out[name] = row
        return out


def patient_split(
    records: Sequence[Record],
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    stratify_label: str | None = None,
) -> Split:
    """Assign whole patients to train / validation / test.

    Parameters
    ----------
    records
        Any records; several per patient is the case this exists for.
    fractions
        Shares of *patients* for train, validation, test (non-negative, summing to 1).
    seed
        Same seed and records → same split, whatever the input order.
    stratify_label
        Split positive and negative patients (maximum of this label over the patient's records)
        separately, so each set gets about the same prevalence. Records without the label count as 0.

    Raises
    ------
    ValueError
        For fractions that are negative or do not sum to 1.
    """
    fr = np.asarray(fractions, dtype=float)
    if fr.shape != (3,) or (fr < 0).any() or not np.isclose(fr.sum(), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        by_patient[record.patient_id].append(i)
    strata: dict[int, list[str]] = defaultdict(list)
    for patient in sorted(by_patient):
        level = 0
        if stratify_label is not None:
            level = max(int(records[i].labels.get(stratify_label, 0)) for i in by_patient[patient])
        strata[level].append(patient)
    rng = np.random.default_rng(seed)
    assignment: dict[str, int] = {}
    for level in sorted(strata):
        patients = strata[level]
        order = rng.permutation(len(patients))
        n = len(patients)
        n_train = int(round(n * fr[0]))
        n_val = min(n - n_train, int(round(n * fr[1])))
        for rank, j in enumerate(order):
            assignment[patients[j]] = 0 if rank < n_train else 1 if rank < n_train + n_val else 2
    sets: list[list[Record]] = [[], [], []]
    for record in records:
        sets[assignment[record.patient_id]].append(record)
    split = Split(*sets)
    logger.info("patient split (seed %d, stratified on %s): %s", seed, stratify_label, split.summary())
    return split


def check_no_leakage(split: Split) -> None:
    """Raise :class:`LabelError` listing the patient IDs that appear in more than one set.

    Why a separate check: a split can also be built by hand, read from disk or merged from two sources;
    training calls this on whatever it is given before the first epoch.
    """
    seen: dict[str, set[str]] = defaultdict(set)
    for name, records in split.sets().items():
        for record in records:
            seen[record.patient_id].add(name)
    leaked = sorted(p for p, names in seen.items() if len(names) > 1)
    if leaked:
        shown = ", ".join(f"{p} ({'/'.join(sorted(seen[p]))})" for p in leaked[:10])
        more = f" and {len(leaked) - 10} more" if len(leaked) > 10 else ""
        raise LabelError(f"{len(leaked)} patient(s) in more than one set: {shown}{more}")
