"""build_seg and the SR's TID 1411 groups: the SEG passes dciodvfy, reads back with the same mask, the SR
references its segment with volume (ml) and diameter (mm), and a negative study gets neither."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, SegmentationStorage, generate_uid

from service.results.quantify import encode_mask, measure, voxel_size
from service.results.schema import Code, Finding, Lesion, MaskFrame, ModelUsed, Segment, StudyResult
from service.results.seg import ABNORMAL_STRUCTURE, SEG_SERIES_DESCRIPTION, build_seg, series_segments
from service.results.sr import build_sr
from service.results.sr_volumes import DIAMETER, VOLUME
from tests.service.dicom_factory import make_dataset
from tests.service.results.dciodvfy import run_dciodvfy

HEMORRHAGE = Code(scheme="SCT", value="1386000", meaning="Intracranial hemorrhage")


def ct_series(n: int = 6, rows: int = 32) -> list[Dataset]:
    """Head CT slices with the geometry a SEG needs (frame of reference, spacing, positions)."""
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = make_dataset(
            study_uid=study,
            series_uid=series,
            modality="CT",
            body_part="HEAD",
            sop_class=CTImageStorage,
            instance_number=i + 1,
            position_z=5.0 * i,
            rows=rows,
            columns=rows,
            value=1064,
        )
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PixelSpacing = [0.8, 0.8]
        ds.SliceThickness = 5.0
        ds.PatientSex = "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.ReferringPhysicianName = "20260101", "120000", "1", ""
        ds.SeriesNumber = 3
        ds.ContentDate, ds.ContentTime = "20260101", "120000"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP, ds.AcquisitionNumber = 120, 1
        ds.Manufacturer = "test"
        out.append(ds)
    return out


def known_mask(n: int, rows: int) -> np.ndarray:
    mask = np.zeros((n, rows, rows), bool)
    mask[2:4, 10:20, 12:16] = True  # 2 slices x 10 x 4 = 80 voxels
    mask[3, 25:27, 25:27] = True  # a second lesion of 4 voxels
    return mask


def segmented_result(slices: list[Dataset], mask: np.ndarray, positive: bool = True) -> StudyResult:
    uids = [str(ds.SOPInstanceUID) for ds in slices]
    voxel = voxel_size(slices)
    size = measure(mask, voxel)
    segment = Segment(
        model="ct-hemorrhage-seg",
        model_version="1.0.0",
        model_sha256="cd" * 32,
        label="hemorrhage",
        code=HEMORRHAGE,
        threshold=0.5,
        volume_ml=size.volume_ml,
        max_axial_diameter_mm=size.max_axial_diameter_mm,
        lesions=[
            Lesion(
                volume_ml=les.volume_ml,
                max_axial_diameter_mm=les.max_axial_diameter_mm,
                widest_instance_uid=uids[les.widest_slice],
            )
            for les in size.lesions
        ],
        voxel_mm=(voxel.row_mm, voxel.column_mm, voxel.slice_mm),
        slice_spacing_source=voxel.slice_source,
        rows=mask.shape[1],
        columns=mask.shape[2],
        instances=uids,
        frames=[
            MaskFrame(sop_instance_uid=uids[k], mask=encode_mask(m)) for k, m in enumerate(mask) if m.any()
        ],
    )
    finding = Finding(
        model="ct-hemorrhage",
        model_version="1.0.0",
        model_sha256="ab" * 32,
        label="hemorrhage",
        code=HEMORRHAGE,
        probability=0.9 if positive else 0.05,
        threshold=0.12,
        positive=positive,
        urgent=positive,
        urgency="stat",
        series_uid=str(slices[0].SeriesInstanceUID),
        key_instance_uid=uids[3],
        segments=[segment],
    )
    return StudyResult(
        result_id="res-seg-1",
        study_uid=str(slices[0].StudyInstanceUID),
        status="complete",
        priority="stat" if positive else "routine",
        findings=[finding],
        models=[ModelUsed(name="ct-hemorrhage", version="1.0.0", sha256="ab" * 32, provider="CPU")],
    )


def _seg(result: StudyResult, slices: list[Dataset]) -> hd.seg.Segmentation:
    (group,) = series_segments(result)
    return build_seg(
        result,
        group,
        {str(ds.SOPInstanceUID): ds for ds in slices},
        sop_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        series_number=9904,
    )


class TestBuildSeg:
    def test_valid_and_reads_back_the_mask(self, tmp_path: Path) -> None:
        slices = ct_series()
        mask = known_mask(6, 32)
        seg = _seg(segmented_result(slices, mask), slices)
        path = tmp_path / "seg.dcm"
        seg.save_as(path, enforce_file_format=True)
        errors, output = run_dciodvfy(path)
        assert errors == 0, output
        back = hd.seg.segread(path)
        assert back.SOPClassUID == SegmentationStorage
        assert back.StudyInstanceUID == slices[0].StudyInstanceUID
        assert back.SeriesDescription == SEG_SERIES_DESCRIPTION
        item = back.SegmentSequence[0]
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == HEMORRHAGE.value
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == ABNORMAL_STRUCTURE.value
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        uids = [str(ds.SOPInstanceUID) for ds in slices]
        frames = back.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
        assert np.array_equal(frames[..., 0] > 0, mask)
        assert int(back.NumberOfFrames) == 2  # empty slices omitted

    def test_sources_without_type2_patient_attributes_give_a_valid_seg(self, tmp_path: Path) -> None:
        """A modality that leaves out Type 2 attributes (PatientSex, StudyID, ...): highdicom raised
        AttributeError, and the result's SR and preview were not sent either."""
        slices = ct_series()
        for ds in slices:
            for keyword in ("PatientSex", "PatientBirthDate", "StudyID", "ReferringPhysicianName"):
                if keyword in ds:
                    delattr(ds, keyword)
        seg = _seg(segmented_result(slices, known_mask(6, 32)), slices)
        path = tmp_path / "seg.dcm"
        seg.save_as(path, enforce_file_format=True)
        errors, output = run_dciodvfy(path)
        assert errors == 0, output
        assert "PatientSex" in seg and not seg.PatientSex and seg.PatientID == slices[0].PatientID
        assert "PatientSex" not in slices[0]  # the caller's datasets are left as they were

    def test_negative_study_gets_no_seg(self) -> None:
        slices = ct_series()
        assert series_segments(segmented_result(slices, known_mask(6, 32), positive=False)) == []

    def test_missing_source_is_an_error(self) -> None:
        slices = ct_series()
        result = segmented_result(slices, known_mask(6, 32))
        with pytest.raises(ValueError, match="missing"):
            build_seg(
                result,
                series_segments(result)[0],
                {},
                sop_instance_uid=generate_uid(),
                series_instance_uid=generate_uid(),
                series_number=9904,
            )


class TestVolumeGroups:
    def test_sr_references_the_segment_with_volume_and_diameter(self, tmp_path: Path) -> None:
        slices = ct_series()
        mask = known_mask(6, 32)
        result = segmented_result(slices, mask)
        seg = _seg(result, slices)
        sr = build_sr(
            result,
            slices,
            sop_instance_uid=generate_uid(),
            series_instance_uid=generate_uid(),
            segmentations={result.findings[0].series_uid: seg},
        )
        path = tmp_path / "sr.dcm"
        sr.save_as(path, enforce_file_format=True)
        errors, output = run_dciodvfy(path)
        assert errors == 0, output
        content = hd.sr.srread(path).content
        assert isinstance(content, hd.sr.MeasurementReport)  # typed as its base, ContentSequence
        groups = content.get_volumetric_roi_measurement_groups()
        assert len(groups) == 1
        ref = groups[0].referenced_segment
        assert ref is not None
        assert ref.referenced_segment_numbers == [1]
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        volume = groups[0].get_measurements(name=VOLUME)[0]
        diameter = groups[0].get_measurements(name=DIAMETER)[0]
        assert volume.unit.value == "ml" and diameter.unit.value == "mm"
        assert volume.value == pytest.approx(84 * 0.8 * 0.8 * 5.0 / 1000, abs=1e-3)
        assert diameter.value == pytest.approx(float(np.hypot(8.0, 3.2)), abs=0.05)
        comments = [
            str(item.TextValue)
            for container in pydicom.dcmread(path).ContentSequence
            for item in container.get("ContentSequence", [])
            if "TextValue" in item
        ]
        assert any("2 lesion(s)" in text for text in comments), comments

    def test_negative_finding_has_no_volume_group(self) -> None:
        slices = ct_series()
        result = segmented_result(slices, known_mask(6, 32), positive=False)
        sr = build_sr(result, slices, sop_instance_uid=generate_uid(), series_instance_uid=generate_uid())
        assert "Volume" not in str(sr.ContentSequence)
