"""A record's image as a pydicom Dataset, whatever its file: DICOM as read, PNG wrapped.

Training reads every image through the service's preprocessing (one pipeline for training and serving), and
that takes DICOM datasets only; PNG-distributed sets (NIH ChestX-ray14) are wrapped here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from training.data.formats.nih import nih_uid
from training.data.records import LabelError

__all__ = ["png_to_dataset", "read_image_dataset"]

_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def png_to_dataset(path: Path) -> Dataset:
    """Wrap a grayscale PNG as an in-memory Secondary Capture MONOCHROME2 dataset.

    Why: the shared ``service.inference.preprocess.preprocess_dataset`` takes DICOM datasets only, and a
    model trained on PNG-distributed data (NIH) must see its pixels through the same pipeline as the service.
    8-bit images get the window that maps 0..255 onto the full output range (they were already windowed for
    display when exported); 16-bit images get none, so the model's percentile window applies. Colour
    images are converted to luminance.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(img, dtype=np.int64)
                pixels, bits = np.clip(array, 0, 65535).astype(np.uint16), 16
            else:
                pixels, bits = np.asarray(img.convert("L"), dtype=np.uint8), 8
    except FileNotFoundError as exc:
        raise LabelError(f"image '{path}' not found") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise LabelError(f"image '{path}' is not a readable PNG: {exc}") from exc
    key = str(path.name)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(_SECONDARY_CAPTURE)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(nih_uid(key, "sop"))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID, ds.SOPInstanceUID = _SECONDARY_CAPTURE, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = nih_uid(key, "study"), nih_uid(key, "series")
    ds.PatientID = path.stem
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if bits == 8:
        ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    return ds


def read_image_dataset(path: Path) -> Dataset:
    """Any record's image as a pydicom Dataset: DICOM as read, ``.png`` through :func:`png_to_dataset`."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        return png_to_dataset(path)
    try:
        return pydicom.dcmread(path)
    except FileNotFoundError as exc:
        raise LabelError(f"image '{path}' not found") from exc
    except Exception as exc:  # pydicom raises many types for a damaged file; all mean "unreadable" here
        raise LabelError(f"image '{path}' is not a readable DICOM file: {exc}") from exc
