"""Patient-level split: whole patients per set, stratified, deterministic, and a leak check that bites."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.data.records import LabelError, Record
from training.data.split import Split, check_no_leakage, patient_split


def _records(n_patients: int = 200, seed: int = 0) -> list[Record]:
    """Patients with one to three studies each; about a quarter of the patients are positive."""
    rng = np.random.default_rng(seed)
    records = []
    for p in range(n_patients):
        positive = rng.random() < 0.25
        for s in range(int(rng.integers(1, 4))):
            records.append(
                Record(
                    path=Path(f"p{p}_{s}.dcm"),
                    patient_id=f"P{p:04d}",
                    study_uid=f"1.2.3.{p}.{s}",
                    series_uid=f"1.2.3.{p}.{s}.1",
                    sop_uid=f"1.2.3.{p}.{s}.1.1",
                    labels={"finding": int(positive and (s == 0 or rng.random() < 0.5))},
                )
            )
    return records


class TestPatientSplit:
    def test_multi_study_patients_never_leak(self) -> None:
        records = _records()
        split = patient_split(records, seed=3, stratify_label="finding")
        check_no_leakage(split)
        assert sorted(map(id, split.train + split.val + split.test)) == sorted(map(id, records))

    def test_fractions_of_patients(self) -> None:
        split = patient_split(_records(), fractions=(0.6, 0.2, 0.2), seed=1)
        patients = {name: len({r.patient_id for r in rs}) for name, rs in split.sets().items()}
        assert patients == {"train": 120, "val": 40, "test": 40}

    def test_stratified_prevalence(self) -> None:
        records = _records(400)
        split = patient_split(records, seed=2, stratify_label="finding")
        rates = []
        for rs in split.sets().values():
            by_patient: dict[str, int] = {}
            for r in rs:
                by_patient[r.patient_id] = max(by_patient.get(r.patient_id, 0), r.labels["finding"])
            rates.append(np.mean(list(by_patient.values())))
        assert max(rates) - min(rates) < 0.03

    def test_deterministic_and_order_independent(self) -> None:
        records = _records()
        a = patient_split(records, seed=5, stratify_label="finding")
        b = patient_split(list(reversed(records)), seed=5, stratify_label="finding")
        c = patient_split(records, seed=6, stratify_label="finding")
        ids = lambda rs: sorted(r.patient_id for r in rs)  # noqa: E731
        assert ids(a.test) == ids(b.test) and ids(a.val) == ids(b.val)
        assert ids(a.test) != ids(c.test)

    def test_rejects_bad_fractions(self) -> None:
        with pytest.raises(ValueError, match="fractions"):
            patient_split(_records(10), fractions=(0.7, 0.2, 0.2))

    def test_summary_has_no_identifiers(self) -> None:
        summary = patient_split(_records(), seed=0).summary("finding")
        assert set(summary) == {"train", "val", "test"}
        assert "P0" not in repr(summary)


class TestLeakageCheck:
    def test_detects_a_leaky_split(self) -> None:
        records = _records(50)
        # an image-level split: multi-study patients straddle the sets
        leaky = Split(train=records[0::3], val=records[1::3], test=records[2::3])
        with pytest.raises(LabelError, match="patient") as info:
            check_no_leakage(leaky)
        leaked = {r.patient_id for r in leaky.train} & {r.patient_id for r in leaky.val}
        assert sorted(leaked)[0] in str(info.value)

    def test_synthetic_set_split_by_patient(self, tmp_path: Path) -> None:
        from training.data.formats.generic import load_generic
        from training.data.synthetic import generate_cxr

        generate_cxr(tmp_path, 10, seed=4)
        records = load_generic(tmp_path)
        assert len({r.patient_id for r in records}) < len(records)  # some patients have two studies
        check_no_leakage(patient_split(records, seed=0, stratify_label="pneumothorax"))
