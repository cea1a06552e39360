"""The PS3.15 Annex E Basic Profile for backends that receive DICOM, on real instances, and re-identification.

Real instances: pydicom's bundled CT, MR, JPEG 2000 and colour test files (real scanner headers, with
names, dates, device and institution attributes) and a synthetic radiograph loaded with sentinel
identifiers in the places a profile most often misses (nested sequences, private tags, overlays). No
identifying value may survive anywhere in the written file, the pixels must, and an object the backend
returns about a de-identified study must come back attached to the real one.
"""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, generate_uid

from service.dicom.deid import Deidentifier
from service.dicom.deid_profile import DUMMY, EMPTY, REMOVE
from service.errors import ReidentificationError
from tests.pydicom_files import pydicom_testdata
from tests.service.dicom_factory import SENTINEL_ACCESSION, SENTINEL_ID, SENTINEL_NAME, make_dataset, to_bytes
from tests.service.results.dciodvfy import run_dciodvfy

REAL_FILES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "examples_ybr_color.dcm")


def _sentinel_radiograph() -> Dataset:
    ds = make_dataset()
    ds.InstitutionName, ds.OperatorsName = "Sentinel General Hospital", "Operator^Sentinel"
    ds.PatientBirthDate, ds.StudyDate, ds.SeriesDate, ds.StudyTime = (
        "19010101",
        "20260315",
        "20260315",
        "101112",
    )
    ds.StudyDescription, ds.ImageComments = "Sentinel study description", "Sentinel comment"
    ds.DeviceSerialNumber, ds.StationName = "SN-SENTINEL-77", "SENTINEL-STATION"
    request = Dataset()
    request.RequestingPhysician, request.AccessionNumber = "Doctor^Sentinel", SENTINEL_ACCESSION
    ds.RequestAttributesSequence = Sequence([request])
    source = Dataset()
    source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = ds.SOPClassUID, generate_uid()
    source.SelectorPNValue = "Observer^Sentinel"  # a PN no table row names: the safety net's job
    ds.SourceImageSequence = Sequence([source])
    ds.add_new(0x00091010, "LO", "Sentinel private")
    ds.add_new(0x60003000, "OW", b"\x00" * 8)  # overlay data
    ds.add_new(0x60004000, "LT", "Sentinel overlay comment")
    ds.FrameOfReferenceUID = generate_uid()
    return ds


def _walk(ds: Dataset) -> Iterator[tuple[Dataset, DataElement]]:
    for elem in ds:
        yield ds, elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def _identifying(ds: Dataset) -> set[str]:
    """Values that identify: names, dates, times, non-standard UIDs and every profile attribute's text."""
    found: set[str] = set()
    for _, elem in _walk(ds):
        if elem.VR not in ("PN", "LO", "SH", "LT", "ST", "UT", "DA", "DT", "TM", "UI", "AE") or elem.is_empty:
            continue  # numbers (a weight, a size) may equal a kept attribute's value: not a leak
        values = list(elem.value) if elem.VM > 1 else [elem.value]
        texts = [str(v) for v in values]
        if (
            elem.VR in ("PN", "DA", "DT", "TM")
            or elem.keyword in REMOVE | EMPTY | DUMMY
            or elem.tag.is_private
        ):
            found.update(t for t in texts if len(t) >= 6)
        if elem.VR == "UI":
            found.update(t for t in texts if UID(t).name == t)
    return found


@pytest.fixture(params=[*REAL_FILES, "sentinel"])
def original(request: pytest.FixtureRequest) -> Dataset:
    if request.param == "sentinel":
        return _sentinel_radiograph()
    return dcmread(pydicom_testdata(request.param))


def test_no_identifying_attribute_survives(original: Dataset, tmp_path: Path) -> None:
    secrets = _identifying(original)
    assert secrets, "the instance must carry something to remove"
    deid = Deidentifier()
    out = deid.deidentify(original)
    written = to_bytes(out)
    # text the profile keeps by design (InstitutionName "TOSHIBA" is removed, Manufacturer "TOSHIBA_MEC"
    # stays) is not a leak
    kept = [str(e.value) for _, e in _walk(out) if e.VR in ("LO", "SH", "CS") and not e.is_empty]
    for secret in (t for t in secrets if not any(t in k for k in kept)):
        assert secret.encode() not in written, f"{secret!r} survived"
    back = dcmread(BytesIO(written))
    for _, elem in _walk(back):
        assert not elem.tag.is_private and elem.tag.group not in range(0x5000, 0x5100)
        assert elem.tag.group not in range(0x6000, 0x6100) and elem.keyword not in REMOVE
        if elem.VR in ("DA", "DT", "TM"):
            assert elem.is_empty, elem
        if elem.VR == "PN" and not elem.is_empty:
            assert str(elem.value).startswith("ANONYMOUS^"), elem
        if elem.VR == "UI" and not elem.is_empty:
            for uid in list(elem.value) if elem.VM > 1 else [elem.value]:
                assert UID(uid).name != uid or uid in deid.map.uids, elem  # standard, or our pseudonym
    assert back.PatientIdentityRemoved == "YES"
    assert back.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID != original.SOPInstanceUID
    assert back.SOPClassUID == original.SOPClassUID
    assert "SourceApplicationEntityTitle" not in back.file_meta
    assert np.array_equal(back.pixel_array, original.pixel_array)
    # still a valid object of its IOD: no dciodvfy error the original did not have
    (tmp_path / "deid.dcm").write_bytes(written)
    (tmp_path / "original.dcm").write_bytes(to_bytes(original))
    errors, output = run_dciodvfy(tmp_path / "deid.dcm")
    assert errors <= run_dciodvfy(tmp_path / "original.dcm")[0], output
    assert "UIDs" in repr(deid.map) and str(original.PatientName or "x") not in repr(deid.map)


def test_pseudonyms_are_consistent_within_a_map_and_new_for_the_next() -> None:
    study, series = generate_uid(), generate_uid()
    a, b = make_dataset(study_uid=study, series_uid=series), make_dataset(study_uid=study, series_uid=series)
    deid = Deidentifier()
    out_a, out_b = deid.deidentify(a), deid.deidentify(b)
    assert out_a.StudyInstanceUID == out_b.StudyInstanceUID != study
    assert out_a.SeriesInstanceUID == out_b.SeriesInstanceUID and out_a.SOPInstanceUID != out_b.SOPInstanceUID
    assert out_a.PatientID == out_b.PatientID != SENTINEL_ID and str(out_a.PatientName) != SENTINEL_NAME
    again = Deidentifier().deidentify(a)
    assert again.StudyInstanceUID != out_a.StudyInstanceUID and again.PatientID != out_a.PatientID


def test_a_returned_object_is_reattached_to_the_real_study() -> None:
    original = _sentinel_radiograph()
    deid = Deidentifier()
    sent = deid.deidentify(original)
    # what a DICOM-in, DICOM-out AI server sends back: a new object in the (pseudonymous) study
    returned = Dataset()
    returned.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    returned.SOPInstanceUID, returned.SeriesInstanceUID = generate_uid(), generate_uid()
    for keyword in (
        "StudyInstanceUID",
        "PatientName",
        "PatientID",
        "PatientIdentityRemoved",
        "AccessionNumber",
    ):
        setattr(returned, keyword, sent.get(keyword))
    evidence = Dataset()
    evidence.ReferencedSOPClassUID, evidence.ReferencedSOPInstanceUID = sent.SOPClassUID, sent.SOPInstanceUID
    returned.SourceImageSequence = Sequence([evidence])

    real = deid.map.reidentify(returned)
    assert real.StudyInstanceUID == original.StudyInstanceUID
    assert real.SourceImageSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert (str(real.PatientName), real.PatientID, real.AccessionNumber) == (
        SENTINEL_NAME,
        SENTINEL_ID,
        SENTINEL_ACCESSION,
    )
    assert (real.StudyDate, real.PatientBirthDate) == ("20260315", "19010101")
    assert real.SOPInstanceUID == returned.SOPInstanceUID  # the backend's own UIDs stay
    assert "PatientIdentityRemoved" not in real and returned.PatientIdentityRemoved == "YES"

    stranger = Dataset()
    stranger.StudyInstanceUID = generate_uid()
    with pytest.raises(ReidentificationError, match="not one of the studies sent"):
        deid.map.reidentify(stranger)
