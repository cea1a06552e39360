"""Synthetic DICOM instances for service tests: chest radiographs, head CT slices, odd cases."""

from __future__ import annotations

from io import BytesIO

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

SENTINEL_NAME = "Sentinel^PHI^Do^Not^Log"
SENTINEL_ID = "PHI-ID-424242"
SENTINEL_ACCESSION = "ACC-SENTINEL1"


def make_dataset(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    modality: str = "CR",
    body_part: str | None = "CHEST",
    rows: int = 64,
    columns: int = 64,
    value: float = 1000.0,
    sop_class: str = ComputedRadiographyImageStorage,
    instance_number: int = 1,
    position_z: float | None = None,
    pixels: np.ndarray | None = None,
    series_description: str | None = None,
) -> Dataset:
    """A small uncompressed MONOCHROME2 image with patient identifiers set to sentinels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = SENTINEL_NAME
    ds.PatientID = SENTINEL_ID
    ds.PatientBirthDate = "19010101"
    ds.AccessionNumber = SENTINEL_ACCESSION
    ds.Modality = modality
    if body_part:
        ds.BodyPartExamined = body_part
    if series_description:
        ds.SeriesDescription = series_description
    ds.InstanceNumber = instance_number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if modality == "CT":
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, position_z if position_z is not None else float(instance_number)]
    if pixels is None:
        pixels = np.full((rows, columns), value, dtype=np.uint16)
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def chest(**kwargs: object) -> bytes:
    """A chest radiograph; a half-bright/half-dark image so the tiny models see a mid-range mean."""
    pixels = np.zeros((64, 64), dtype=np.uint16)
    pixels[:, 32:] = 4000
    pixels[8:20, 8:20] = 4000  # a bright blob for the detector
    kwargs.setdefault("pixels", pixels)
    return to_bytes(make_dataset(**kwargs))  # type: ignore[arg-type]


def head_ct_series(n: int = 5, study_uid: str | None = None, hu: float = 60.0) -> list[bytes]:
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    return [
        to_bytes(
            make_dataset(
                study_uid=study_uid,
                series_uid=series_uid,
                modality="CT",
                body_part="HEAD",
                sop_class=CTImageStorage,
                instance_number=i + 1,
                position_z=float(n - i),  # reverse order on purpose: sorting must use the position
                value=hu + 1024,
            )
        )
        for i in range(n)
    ]


def multipart_related(parts: list[bytes], boundary: str = "b0undary-xyz") -> tuple[bytes, str]:
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts
    )
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'
