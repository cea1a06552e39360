"""Writing the generated pictures as DICOM Part 10 files plus the generic ``labels.csv``.

Images are written exactly as a modality would: CR or DX (PS3.3 A.2, A.26) and CT (A.3) with patient and
study identifiers, so training runs through the same loader and the same shared preprocessing
(``service.inference.preprocess``) that real data would.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from training.data.records import Record
from training.data.synthetic.chest_acquisition import cxr_stored
from training.data.synthetic.chest_anatomy import draw_chest, render_cxr
from training.data.synthetic.common import (
    CT_LABELS,
    CXR_LABELS,
    KIND_CT,
    KIND_CXR,
    MANUFACTURER,
    Patient,
    draw_patient,
    study_date,
    uid,
)
from training.data.synthetic.ct_anatomy import render_ct

__all__ = ["MASK_FILE", "generate_ct", "generate_cxr", "read_mask"]

logger = logging.getLogger(__name__)

_CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
_DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_CXR_SHAPES = ((512, 512), (512, 480), (480, 512), (512, 448), (448, 512))
_CXR_COLUMNS = ("file", *CXR_LABELS, "boxes", "patient_id", "study_uid", "series_uid", "modality")
_CXR_INFO = (
    "info_view",
    "info_photometric",
    "info_ptx_side",
    "info_ptx_depth",
    "info_ptx_size",
    "info_nodule_radii",
    "info_processing",
    "info_extras",
)
_CT_COLUMNS = ("file", *CT_LABELS, "boxes", "patient_id", "study_uid", "series_uid", "modality")
_CT_INFO = (
    "info_slice",
    "info_hemorrhage_type",
    "info_hemorrhage_hu",
    "info_hemorrhage_size_mm",
    "info_kernel",
    "info_hu_offset",
    "info_mask",
)
MASK_FILE = "hemorrhage_mask.npz"
"""Per series, beside its slices: ``mask`` uint8 ``[slices, rows, cols]`` in ``info_slice`` order."""


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PACS_TRIAGE_SYN"
    return meta


def _common(ds: Dataset, patient: Patient, date: dt.date, clock: str, accession: str) -> None:
    """Patient, General Study, General Equipment and SOP Common attributes shared by every IOD here."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{min(999, (date - patient.birth).days // 365):03d}Y"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = clock
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.StudyDate, clock
    ds.AccessionNumber = accession
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "synthetic generator"
    ds.InstitutionName = "pacs-triage synthetic"
    ds.SoftwareVersions = "1"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"


def _save(ds: Dataset, pixels: np.ndarray, path: Path) -> None:
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    ds["PixelData"].VR = "OW"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _cxr_patient(job: tuple[Path, int, int]) -> list[dict[str, str]]:
    """Render and write every study of one chest patient; returns its labels.csv rows."""
    out_dir, seed, index = job
    rng = np.random.default_rng([seed, KIND_CXR, index])
    patient = draw_patient(rng, seed, KIND_CXR, index)
    chest = draw_chest(rng, patient.sex)
    n_studies = 1 if rng.random() < 0.6 else 2
    rows_out, date = [], None
    for study in range(n_studies):
        srng = np.random.default_rng([seed, KIND_CXR, index, study + 1])
        date, clock = study_date(srng, date)
        rows, cols = _CXR_SHAPES[int(srng.integers(len(_CXR_SHAPES)))]
        ap = srng.random() < 0.25
        dx = srng.random() < 0.5
        mono1 = srng.random() < 0.4
        result = render_cxr(chest, srng, rows, cols, ap)
        stored, center, width, processing = cxr_stored(result.att, srng, mono1, ap)
        study_uid, series_uid = (
            uid(seed, KIND_CXR, index, study, "study"),
            uid(seed, KIND_CXR, index, study, "series"),
        )
        sop_uid = uid(seed, KIND_CXR, index, study, "sop")
        sop_class = _DX_PRESENTATION_STORAGE if dx else _CR_STORAGE
        ds = Dataset()
        ds.file_meta = _file_meta(sop_class, sop_uid)
        _common(ds, patient, date, clock, f"A{seed % 10000:04d}{index:07d}{study}")
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality = "DX" if dx else "CR"
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = "AP" if ap else "PA"
        ds.PatientOrientation = ["L", "F"]  # columns run to the patient's left, rows to the feet
        ds.StudyDescription = "XR CHEST 1 VIEW"
        ds.SeriesDescription = f"CHEST {ds.ViewPosition}"
        ds.InstanceNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.KVP = "120" if not ap else "90"
        ds.ImagerPixelSpacing = [round(0.7 * 512 / max(rows, cols), 4)] * 2
        ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
        ds.BitsStored, ds.HighBit = 12, 11
        ds.WindowCenter, ds.WindowWidth = center, width
        ds.VOILUTFunction = "LINEAR"
        if dx:  # DX Series, DX Anatomy Imaged, DX Image, DX Detector, Acquisition Context (PS3.3 A.26)
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.ImageLaterality = "U"
            region = Dataset()
            region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "43799004", "SCT", "Chest"
            ds.AnatomicRegionSequence = DicomSequence([region])
            ds.PixelIntensityRelationship = "LIN"
            ds.PixelIntensityRelationshipSign = 1 if mono1 else -1
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
            ds.PresentationLUTShape = "INVERSE" if mono1 else "IDENTITY"
            ds.DetectorType = "SCINTILLATOR"
            ds.AcquisitionContextSequence = DicomSequence([])
        path = out_dir / "cxr" / f"{patient.patient_id}_{study + 1}.dcm"
        _save(ds, stored, path)
        rows_out.append(
            {
                "file": path.relative_to(out_dir).as_posix(),
                "pneumothorax": str(result.pneumothorax),
                "nodule": str(int(bool(result.boxes))),
                "boxes": _boxes_json(result.boxes, "nodule"),
                "patient_id": patient.patient_id,
                "study_uid": study_uid,
                "series_uid": series_uid,
                "modality": ds.Modality,
                "info_view": ds.ViewPosition,
                "info_photometric": ds.PhotometricInterpretation,
                "info_ptx_side": result.ptx_side,
                "info_ptx_depth": f"{result.ptx_depth:.3f}" if result.pneumothorax else "",
                "info_ptx_size": result.ptx_size,
                "info_nodule_radii": " ".join(str(r) for r in result.nodule_radii),
                "info_processing": processing,
                "info_extras": " ".join(result.extras),
            }
        )
    return rows_out


def _ct_patient(job: tuple[Path, int, int]) -> list[dict[str, str]]:
    """Render and write one head CT series; returns one labels.csv row per slice."""
    out_dir, seed, index = job
    rng = np.random.default_rng([seed, KIND_CT, index])
    patient = draw_patient(rng, seed, KIND_CT, index)
    date, clock = study_date(rng, None)
    series = render_ct(rng)
    study_uid, series_uid = uid(seed, KIND_CT, index, "study"), uid(seed, KIND_CT, index, "series")
    frame_uid = uid(seed, KIND_CT, index, "frame")
    descending = rng.random() < 0.3  # some scanners number slices from the vertex down
    n = len(series.hu)
    size = series.hu[0].shape[0]
    rows_out = []
    mask_path = out_dir / "ct" / patient.patient_id / MASK_FILE
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(mask_path, mask=np.stack(series.masks))
    for k, hu in enumerate(series.hu):
        sop_uid = uid(seed, KIND_CT, index, "sop", k)
        ds = Dataset()
        ds.file_meta = _file_meta(_CT_STORAGE, sop_uid)
        _common(ds, patient, date, clock, f"H{seed % 10000:04d}{index:07d}")
        ds.SOPClassUID, ds.SOPInstanceUID = _CT_STORAGE, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PositionReferenceIndicator = ""
        ds.Modality = "CT"
        ds.BodyPartExamined = "HEAD"
        ds.PatientPosition = "HFS"
        ds.StudyDescription = "CT HEAD WO CONTRAST"
        ds.SeriesDescription = "HEAD AXIAL 5MM"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = n - k if descending else k + 1
        ds.KVP = "120"
        ds.ConvolutionKernel = series.kernel
        ds.SliceThickness = 5
        half = size / 2 * series.spacing
        ds.ImagePositionPatient = [round(-half, 3), round(-half, 3), series.z[k]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = series.z[k]
        ds.PixelSpacing = [series.spacing, series.spacing]
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsStored, ds.HighBit = 12, 11
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 80
        ds.WindowCenterWidthExplanation = "BRAIN"
        path = out_dir / "ct" / patient.patient_id / f"IM{int(ds.InstanceNumber):04d}.dcm"
        _save(ds, np.clip(np.rint(hu + 1024), 0, 4095).astype(np.uint16), path)
        box = series.boxes[k]
        rows_out.append(
            {
                "file": path.relative_to(out_dir).as_posix(),
                "hemorrhage": str(series.labels[k]),
                "boxes": _boxes_json([box] if box else [], "hemorrhage"),
                "patient_id": patient.patient_id,
                "study_uid": study_uid,
                "series_uid": series_uid,
                "modality": "CT",
                "info_slice": str(k),
                "info_hemorrhage_type": series.kind,
                "info_hemorrhage_hu": f"{series.value:.1f}" if series.kind else "",
                "info_hemorrhage_size_mm": f"{series.size_mm:.1f}" if series.kind else "",
                "info_kernel": series.kernel,
                "info_hu_offset": f"{series.offset_hu:.2f}",
                "info_mask": mask_path.relative_to(out_dir).as_posix(),
            }
        )
    return rows_out


def _boxes_json(boxes: Sequence[tuple[float, float, float, float]], label: str) -> str:
    items = [
        {
            "x0": round(b[0], 2),
            "y0": round(b[1], 2),
            "x1": round(b[2], 2),
            "y1": round(b[3], 2),
            "label": label,
        }
        for b in boxes
    ]
    return json.dumps(items, separators=(",", ":"))


def _generate(
    out_dir: Path,
    n_patients: int,
    seed: int,
    workers: int,
    job: Callable[[tuple[Path, int, int]], list[dict[str, str]]],
    columns: Sequence[str],
) -> Path:
    if n_patients < 1:
        raise ValueError(f"n_patients must be at least 1, got {n_patients}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(out_dir, seed, i) for i in range(n_patients)]
    start = time.perf_counter()
    if workers > 1:
        # spawn, not fork: the caller may already hold torch threads, which do not survive a fork.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(job, jobs, chunksize=max(1, n_patients // (workers * 8))))
    else:
        results = [job(j) for j in jobs]
    rows = [row for patient_rows in results for row in patient_rows]
    labels_csv = out_dir / "labels.csv"
    with labels_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    elapsed = time.perf_counter() - start
    logger.info(
        "wrote %d images for %d patients in %.1f s (%d workers)", len(rows), n_patients, elapsed, workers
    )
    return labels_csv


def generate_cxr(out_dir: Path, n_patients: int, seed: int, workers: int = 1) -> Path:
    """Write synthetic frontal chest radiographs (CR and DX) and their labels; return ``labels.csv``.

    Parameters
    ----------
    out_dir
        Folder to write into (created); images go to ``out_dir/cxr/<PatientID>_<study>.dcm``.
    n_patients
        Patients to draw; each has one or two studies of one image, so about 1.4 images per patient.
        Several studies per patient share the anatomy, which is what makes a patient-level split matter.
    seed
        Everything (pixels, labels, UIDs) is a function of ``seed`` and the patient index only.
    workers
        Processes to render with; the output is identical for any value.

    Returns
    -------
    Path
        ``out_dir/labels.csv`` in the generic format: ``file``, ``pneumothorax``, ``nodule``, ``boxes``
        (JSON, label ``nodule``, source pixels), and informational columns (``patient_id``, ``study_uid``,
        ``series_uid``, ``modality``, ``info_*``).
    """
    return _generate(out_dir, n_patients, seed, workers, _cxr_patient, (*_CXR_COLUMNS, *_CXR_INFO))


def generate_ct(out_dir: Path, n_patients: int, seed: int, workers: int = 1) -> Path:
    """Write synthetic non-contrast head CT series (24-32 slices of 5 mm) and per-slice labels.

    One series per patient, under ``out_dir/ct/<PatientID>/IM<InstanceNumber>.dcm``. Roughly a third of the
    series number their instances from the vertex down, so slice order must come from ImagePositionPatient
    (as :func:`training.data.formats.generic.load_generic` does), not from file names.

    Returns
    -------
    Path
        ``out_dir/labels.csv``: one row per slice with ``hemorrhage`` (0/1 for that slice), ``boxes`` (label
        ``hemorrhage``), informational columns. The series label is the maximum over its slices.
    """
    return _generate(out_dir, n_patients, seed, workers, _ct_patient, (*_CT_COLUMNS, *_CT_INFO))


def read_mask(root: Path, record: Record) -> np.ndarray:
    """The per-pixel hemorrhage mask (uint8, 1 = blood) of one generated CT slice.

    ``root`` is the folder holding ``labels.csv``; ``record`` one of its CT records (``info_mask`` and
    ``info_slice`` in :attr:`Record.extra`).
    """
    with np.load(Path(root) / record.extra["info_mask"]) as data:
        return np.asarray(data["mask"][int(record.extra["info_slice"])])
