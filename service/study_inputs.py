"""A study's images as the models read them: headers for routing and slice order, pixels one instance at a
time, and the VOI output shared by the models that agree on it.

Why headers first and pixels per slice: a 1,000-slice CT read whole holds every file's bytes plus pydicom's
decoded array of each (~1.2 MiB per 512 x 512 slice: 1.4 GiB measured for one study, issue 13). Routing,
the series description and the scan order need only the headers (read with ``defer_size``: a value over
:data:`DEFER_BYTES` stays on disk, and the truncation check measures it against the file size); each slice's
pixels are read (pydicom's deferred read of the values the header left on disk: one open, one seek, the
pixel data, instead of parsing the file a second time), turned into the model's input size and dropped, so
what a series holds at once is its model inputs (64 KiB per slice at 128 x 128) and one slice in flight per
model. Each series comes back in scan order (:func:`order_slices`, in the thread that read it: ordering
converts every slice's geometry, which on the event loop held it ~12 ms per 32-slice CT).
Instances an HTTP request holds parsed are used as they are: nothing is read back (the one pass of
:mod:`service.api.studies`).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from service.errors import PreprocessError
from service.inference.card import ModelCard
from service.inference.preprocess import Preprocessed, model_input, unit_frames
from service.store.instances import InstanceRecord
from service.store.validate import DEFER_BYTES, truncation

__all__ = ["Item", "SharedUnits", "get_value", "int_value", "order_slices", "read_study"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One instance of a series: its row, its dataset (whole if held, else the header only) and, for a
    header-only one, the file its pixels are read from when a model needs them."""

    record: InstanceRecord
    dataset: Dataset
    pixels_from: Path | None = None


UnitKey = tuple[str, tuple[object, ...]]


def _pixels(item: Item) -> Dataset:
    """The whole dataset of ``item``: the held one, or the header with the values it left on disk read now
    into a copy of its element map (dropped by the caller after use; the header stays light). The file was
    measured for truncation when the header was read (:func:`read_study`); a value that no longer reads back
    as the header declared it (the file changed or went) is a reason, never a guess."""
    if item.pixels_from is None:
        return item.dataset
    whole = copy.copy(item.dataset)  # shares the elements; gets a map of its own below
    whole._dict = dict(item.dataset._dict)  # pydicom stores the values it reads into the dataset's map
    try:
        for elem in list(whole.values()):
            if isinstance(elem, RawDataElement) and elem.value is None and elem.length:  # left on disk
                whole[elem.tag]  # noqa: B018 - pydicom's deferred read (filereader.read_deferred_data_element)
    except Exception as exc:  # a file we stored must read back; if not, say so in the result
        logger.warning("stored instance cannot be read back: %s", type(exc).__name__)
        raise PreprocessError("the stored file cannot be read back") from exc
    return whole


class SharedUnits:
    """The VOI output of each instance (:func:`service.inference.preprocess.unit_frames`), computed once for
    all the models of its series that agree on it, kept only until the last of them has taken it.

    Why: both chest models read the same radiograph with the same VOI settings; decoding, the modality LUT
    and the window were done once per model, about half of the preprocessing of a 1024 x 1024 image. A
    series read by one model caches nothing (a CT series' units would otherwise be held for nothing). The
    lock per instance keeps a second model from computing the same units at the same time.
    """

    def __init__(self, uses: Counter[UnitKey]) -> None:
        self._uses = uses
        self._held: dict[UnitKey, np.ndarray | PreprocessError] = {}
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()

    @staticmethod
    def plan(routed: list[tuple[ModelCard, list[Item]]]) -> SharedUnits:
        """Count, for every (instance, VOI settings), how many model routes will read it."""
        uses: Counter[UnitKey] = Counter()
        for card, items in routed:
            key = card.preprocessing.unit_key
            uses.update((item.record.sop_instance_uid, key) for item in items)
        return SharedUnits(uses)

    def preprocess(self, item: Item, card: ModelCard) -> Preprocessed:
        """The model input of ``card`` for one instance; raises PreprocessError as the pipeline does."""
        uid, spec = item.record.sop_instance_uid, card.preprocessing
        key = (uid, spec.unit_key)
        with self._guard:
            lock = self._locks[uid]
        with lock:
            units = self._held.pop(key, None)
            if units is None:
                try:
                    units = unit_frames(_pixels(item), spec)
                except PreprocessError as exc:
                    units = exc
            self._uses[key] -= 1
            if self._uses[key] > 0:
                self._held[key] = units
        if isinstance(units, PreprocessError):
            raise units
        return model_input(units, spec)


def read_study(
    records: list[InstanceRecord], held: Mapping[str, Dataset]
) -> tuple[dict[str, list[Item]], list[tuple[str, str]]]:
    """Items by series in scan order (``held`` datasets as they are, the others' headers read from disk), and
    ``(series_uid, reason)`` for instances that cannot be analysed as stored: unreadable, or truncated
    (kept by ``store.keep_truncated``: the result says so, issue 15, whether or not a model reads it)."""
    by_series: dict[str, list[Item]] = defaultdict(list)
    skipped: list[tuple[str, str]] = []
    for rec in records:
        ds = held.get(rec.sop_instance_uid)
        if ds is not None:
            by_series[rec.series_uid].append(Item(rec, ds))
            continue
        try:
            header = dcmread(rec.path, defer_size=DEFER_BYTES)
            cut = truncation(header, rec.path.stat().st_size)
        except Exception as exc:  # a file we stored must read back; if not, say so in the result
            logger.warning("stored instance cannot be read back: %s", type(exc).__name__)
            skipped.append((rec.series_uid, "not analysed: a stored instance cannot be read back"))
            continue
        if cut is not None:
            skipped.append(
                (rec.series_uid, f"not analysed: instance {rec.sop_instance_uid} is truncated ({cut})")
            )
            continue
        by_series[rec.series_uid].append(Item(rec, header, rec.path))
    for series_uid, items in by_series.items():
        by_series[series_uid] = [items[i] for i in order_slices([item.dataset for item in items])]
    return by_series, skipped


def get_value(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """``ds.get`` that treats a value pydicom cannot convert as absent: pydicom converts on first access
    and raises (BytesLengthException, OSError for a garbled sequence, ValueError) for a wrong VR or
    length; such an exception here failed the whole study's job (tests/reliability/test_fuzz_dicom.py).
    Preprocessing then says precisely what is wrong with the instance."""
    try:
        return ds.get(keyword, default)
    except Exception:
        return default


def int_value(value: Any, default: int) -> int:
    try:
        return int(value or default)
    except (TypeError, ValueError, OverflowError):
        return default


def order_slices(datasets: list[Dataset]) -> list[int]:
    """Indices of ``datasets`` in scan order: position along the slice normal, else InstanceNumber.

    The normal is the cross product of the ImageOrientationPatient row and column cosines (PS3.3
    C.7.6.2.1.1); projecting ImagePositionPatient on it orders slices whatever the patient orientation.
    """
    try:
        iop = np.asarray([float(v) for v in datasets[0].ImageOrientationPatient], dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        keys = [float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])) for ds in datasets]
        return sorted(range(len(datasets)), key=lambda i: keys[i])
    except Exception:  # missing or garbled geometry (pydicom raises many types on access): InstanceNumber
        values = [int_value(get_value(ds, "InstanceNumber", 0), 0) for ds in datasets]
        return sorted(range(len(datasets)), key=lambda i: values[i])
