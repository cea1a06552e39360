"""build_sr: every SR passes dciodvfy and dsrdump, and reads back through highdicom with the same numbers."""

from __future__ import annotations

import subprocess
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as SRCode
from pydicom.uid import (
    Comprehensive3DSRStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    generate_uid,
)

from service.results.schema import Code, Detection, Finding, ModelUsed, NotAnalysed, StudyResult
from service.results.sr import (
    MANUFACTURER,
    PROBABILITY,
    QUALITATIVE_EVALUATIONS,
    SR_SERIES_DESCRIPTION,
    SRReference,
    build_sr,
)
from tests.service.dicom_factory import (
    SENTINEL_ACCESSION,
    SENTINEL_ID,
    SENTINEL_NAME,
    head_ct_series,
    make_dataset,
)
from tests.service.results.dciodvfy import run_dciodvfy

DSRDUMP = "/usr/bin/dsrdump"
NODULE = Code(scheme="SCT", value="786838002", meaning="Pulmonary nodule")
PNEUMOTHORAX = Code(scheme="SCT", value="36118008", meaning="Pneumothorax")
HEMORRHAGE = Code(scheme="SCT", value="1386000", meaning="Intracranial hemorrhage")


def measurement_report(ds: Dataset) -> hd.sr.MeasurementReport:
    """The TID 1500 report of an SR we wrote, read back by highdicom (``content`` is typed as its base)."""
    content = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


def finding(ds: Dataset, code: Code = NODULE, *, positive: bool = True, **overrides: object) -> Finding:
    values: dict[str, object] = {
        "model": "cxr-nodule",
        "model_version": "1.0.0",
        "model_sha256": "ab" * 32,
        "label": code.meaning.split()[-1].lower(),
        "code": code,
        "probability": 0.83 if positive else 0.04,
        "threshold": 0.19,
        "positive": positive,
        "urgent": False,
        "urgency": "routine",
        "series_uid": str(ds.SeriesInstanceUID),
        "key_instance_uid": str(ds.SOPInstanceUID),
    }
    values.update(overrides)
    return Finding(**values)


def study_result(study_uid: str, findings: list[Finding], **overrides: object) -> StudyResult:
    models = list({(f.model, f.model_version): f for f in findings}.values())
    values: dict[str, object] = {
        "result_id": "res-0001",
        "study_uid": study_uid,
        "status": "complete",
        "priority": "routine",
        "findings": findings,
        "models": [
            ModelUsed(name=f.model, version=f.model_version, sha256=f.model_sha256, provider="CPU")
            for f in models
        ],
    }
    values.update(overrides)
    return StudyResult(**values)


def build(result: StudyResult, sources: list[Dataset], **kwargs: object) -> hd.sr.Comprehensive3DSR:
    return build_sr(
        result,
        sources,
        sop_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        **kwargs,  # type: ignore[arg-type]
    )


def write_and_check(sr: Dataset, tmp_path: Path) -> Dataset:
    """Write as a Part 10 file, require 0 dciodvfy errors and a clean dsrdump, return the file read back."""
    path = tmp_path / f"{sr.SOPInstanceUID}.dcm"
    pydicom.dcmwrite(path, sr, enforce_file_format=True)
    errors, output = run_dciodvfy(path)
    assert errors == 0, output
    if not Path(DSRDUMP).exists():
        pytest.skip("dsrdump (Debian package dcmtk) is not installed")
    proc = subprocess.run([DSRDUMP, "-v", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = [line for line in (proc.stdout + proc.stderr).splitlines() if line[:2] in ("E:", "W:", "F:")]
    assert not bad, "\n".join(bad)
    return pydicom.dcmread(path)


def comments(ds: Dataset) -> list[str]:
    container = next(
        item
        for item in ds.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == QUALITATIVE_EVALUATIONS.value
    )
    return [str(item.TextValue) for item in container.ContentSequence]


def roi_source(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations) -> Dataset:
    assert group.roi is not None
    return group.roi.ContentSequence[0].ReferencedSOPSequence[0]


class TestBuildSR:
    def test_cr_detections_are_closed_polylines_in_the_source_pixels(self, tmp_path: Path) -> None:
        ds = make_dataset()
        boxes = [(8.0, 8.0, 20.0, 20.0, 0.83), (30.5, 40.0, 50.0, 60.25, 0.31)]
        detections = [
            Detection(sop_instance_uid=ds.SOPInstanceUID, frame=1, x0=x0, y0=y0, x1=x1, y1=y1, score=s)
            for x0, y0, x1, y1, s in boxes
        ]
        result = study_result(ds.StudyInstanceUID, [finding(ds, detections=detections)])
        back = write_and_check(build(result, [ds]), tmp_path)

        assert back.SOPClassUID == Comprehensive3DSRStorage
        assert back.Manufacturer == MANUFACTURER
        assert back.SeriesDescription == SR_SERIES_DESCRIPTION
        assert back.StudyInstanceUID == ds.StudyInstanceUID
        assert back.PatientID == SENTINEL_ID  # copied from the source, as it must be
        assert (back.CompletionFlag, back.VerificationFlag, back.PreliminaryFlag) == (
            "COMPLETE",
            "UNVERIFIED",
            "PRELIMINARY",
        )
        assert back.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        evidence = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
        assert comments(back)[0].startswith("AI triage result - not for diagnostic use")

        report = measurement_report(back)
        rois = report.get_planar_roi_measurement_groups()
        assert len(rois) == 2
        for group, (x0, y0, x1, y1, score) in zip(rois, boxes, strict=True):
            assert group.roi is not None
            assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
            expected = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
            np.testing.assert_allclose(group.roi.value, expected, rtol=0, atol=1e-4)
            assert roi_source(group).ReferencedSOPInstanceUID == ds.SOPInstanceUID
            assert "ReferencedFrameNumber" not in roi_source(group)  # single-frame image
            assert group.finding_type == SRCode("786838002", "SCT", "Pulmonary nodule")
            (measurement,) = group.get_measurements(name=PROBABILITY)
            assert measurement.value == pytest.approx(score)
            assert measurement.unit == codes.UCUM.NoUnits

        (summary,) = report.get_image_measurement_groups()
        (probability,) = summary.get_measurements(name=PROBABILITY)
        assert probability.value == pytest.approx(0.83)
        (evaluation,) = summary.get_qualitative_evaluations()
        assert evaluation.name == SRCode("786838002", "SCT", "Pulmonary nodule")
        assert evaluation.value == codes.SCT.Present
        assert [img.referenced_sop_instance_uid for img in summary.source_images] == [ds.SOPInstanceUID]

    def test_cr_classification_only_is_one_image_level_group(self, tmp_path: Path) -> None:
        ds = make_dataset()
        result = study_result(
            ds.StudyInstanceUID,
            [finding(ds, PNEUMOTHORAX, positive=False, model="cxr-pneumothorax", label="pneumothorax")],
        )
        back = write_and_check(build(result, [ds]), tmp_path)

        report = measurement_report(back)
        assert report.get_planar_roi_measurement_groups() == []
        (group,) = report.get_image_measurement_groups()
        assert group.tracking_identifier == "cxr-pneumothorax: pneumothorax"
        (probability,) = group.get_measurements(name=PROBABILITY)
        assert probability.value == pytest.approx(0.04)
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.name == SRCode("36118008", "SCT", "Pneumothorax")
        assert evaluation.value == codes.SCT.Absent
        assert group.source_images[0].referenced_sop_instance_uid == ds.SOPInstanceUID
        assert back.ContentSequence[1].ConceptNameCodeSequence[0].CodeValue == "121005"  # Observer Type
        model_name = next(
            item.TextValue
            for item in back.ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue == "121015"
        )
        assert model_name == "cxr-pneumothorax"
        assert back.SoftwareVersions == "cxr-pneumothorax 1.0.0"

    def test_algorithm_identification_carries_the_reproducibility_record(self, tmp_path: Path) -> None:
        """TID 4019 Algorithm Parameters (DCM 111002): threshold and sha256, then card and preprocessing
        versions, our version and the execution provider of the model that ran."""
        ds = make_dataset()
        f = finding(ds, PNEUMOTHORAX, model="cxr-pneumothorax", label="pneumothorax")
        used = ModelUsed(
            name=f.model,
            version=f.model_version,
            sha256=f.model_sha256,
            provider="CPUExecutionProvider",
            card_version=2,
            preprocessing_version=2,
            code_version="pacs-triage 0.1.0",
            input_instances=[str(ds.SOPInstanceUID)],
        )
        result = study_result(ds.StudyInstanceUID, [f], models=[used])
        back = write_and_check(build(result, [ds]), tmp_path)

        def parameters(items: list[Dataset]) -> list[str]:
            found = []
            for item in items:
                if item.ConceptNameCodeSequence[0].CodeValue == "111002":
                    found.append(str(item.TextValue))
                found.extend(parameters(item.get("ContentSequence", [])))
            return found

        values = parameters(back.ContentSequence)
        assert values[:6] == [
            "threshold=0.19",
            f"sha256={f.model_sha256}",
            "card_version=2",
            "preprocessing_version=2",
            "code_version=pacs-triage 0.1.0",
            "execution_provider=CPUExecutionProvider",
        ]

    def test_ct_key_slice_and_a_second_series_of_the_study(self, tmp_path: Path) -> None:
        series = [pydicom.dcmread(BytesIO(raw)) for raw in head_ct_series(5)]
        study_uid = series[0].StudyInstanceUID
        other = make_dataset(
            study_uid=study_uid, modality="CT", sop_class=series[0].SOPClassUID, body_part="HEAD"
        )
        key = series[2]
        hemorrhage = finding(
            key, HEMORRHAGE, model="ct-hemorrhage", label="hemorrhage", urgent=True, urgency="stat"
        )
        second = finding(other, HEMORRHAGE, positive=False, model="ct-hemorrhage", label="hemorrhage")
        result = study_result(study_uid, [hemorrhage, second], priority="stat")
        back = write_and_check(build(result, [*series, other]), tmp_path)

        sr = hd.sr.Comprehensive3DSR.from_dataset(back)
        report = measurement_report(back)
        groups = report.get_image_measurement_groups()
        assert [g.source_images[0].referenced_sop_instance_uid for g in groups] == [
            key.SOPInstanceUID,
            other.SOPInstanceUID,
        ]
        assert [g.get_qualitative_evaluations()[0].value for g in groups] == [
            codes.SCT.Present,
            codes.SCT.Absent,
        ]
        assert set(sr.get_evidence_series()) == {
            (study_uid, key.SeriesInstanceUID),
            (study_uid, other.SeriesInstanceUID),
        }
        evidence = {uid for _, _, uid, _ in sr.get_evidence()}
        assert evidence == {key.SOPInstanceUID, other.SOPInstanceUID}  # referenced instances only
        procedure = next(
            item for item in back.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121058"
        )
        assert procedure.ConceptCodeSequence[0].CodeMeaning == "CT unspecified body region"

    def test_predecessor_documents_sequence(self, tmp_path: Path) -> None:
        ds = make_dataset()
        old = SRReference(
            study_uid=ds.StudyInstanceUID, series_uid=generate_uid(), sop_instance_uid=generate_uid()
        )
        result = study_result(ds.StudyInstanceUID, [finding(ds)], supersedes="res-0000", result_id="res-0002")
        back = write_and_check(build(result, [ds], predecessor=old), tmp_path)

        (study_item,) = back.PredecessorDocumentsSequence
        assert study_item.StudyInstanceUID == old.study_uid
        (series_item,) = study_item.ReferencedSeriesSequence
        assert series_item.SeriesInstanceUID == old.series_uid
        (sop_item,) = series_item.ReferencedSOPSequence
        assert sop_item.ReferencedSOPInstanceUID == old.sop_instance_uid
        assert sop_item.ReferencedSOPClassUID == Comprehensive3DSRStorage
        assert "supersedes pacs-triage result res-0000" in comments(back)
        assert SRReference.from_dataset(back).sop_instance_uid == back.SOPInstanceUID

    def test_supersedes_names_the_result_of_the_sr_it_replaces(self, tmp_path: Path) -> None:
        """A head CT's measured result supersedes its measurements-pending flag, which no SR was made for:
        the SR names the result the PACS holds an SR of (its predecessor), or none when there is none."""
        ds = make_dataset()
        flagged_first = study_result(
            ds.StudyInstanceUID, [finding(ds)], supersedes="res-flag", result_id="res-0003"
        )
        first = write_and_check(build(flagged_first, [ds]), tmp_path)
        assert "supersedes" not in " ".join(comments(first))  # the PACS has nothing of ours to supersede
        old = SRReference(
            study_uid=ds.StudyInstanceUID,
            series_uid=generate_uid(),
            sop_instance_uid=generate_uid(),
            result_id="res-0001",
        )
        again = write_and_check(build(flagged_first, [ds], predecessor=old), tmp_path)
        assert "supersedes pacs-triage result res-0001" in comments(again)
        assert "res-flag" not in " ".join(comments(again))

    def test_multiframe_source_references_the_frame(self, tmp_path: Path) -> None:
        ds = make_dataset(modality="OT", sop_class=MultiFrameGrayscaleWordSecondaryCaptureImageStorage)
        ds.NumberOfFrames = 3
        ds.PixelData = np.zeros((3, 64, 64), dtype=np.uint16).tobytes()
        detection = Detection(
            sop_instance_uid=ds.SOPInstanceUID, frame=2, x0=1, y0=2, x1=30, y1=40, score=0.7
        )
        result = study_result(ds.StudyInstanceUID, [finding(ds, key_frame=2, detections=[detection])])
        back = write_and_check(build(result, [ds]), tmp_path)

        report = measurement_report(back)
        (roi,) = report.get_planar_roi_measurement_groups()
        assert roi_source(roi).ReferencedFrameNumber == 2
        (summary,) = report.get_image_measurement_groups()
        assert summary.source_images[0].referenced_frame_numbers == [2]

    def test_not_analysed_result_is_a_valid_report_with_reasons(self, tmp_path: Path) -> None:
        ds = make_dataset(modality="XA")
        reason = "not analysed: no model for modality XA"
        result = study_result(
            ds.StudyInstanceUID,
            [],
            status="not_analysed",
            not_analysed=[NotAnalysed(series_uid=ds.SeriesInstanceUID, reason=reason)],
        )
        back = write_and_check(build(result, [ds]), tmp_path)

        assert back.CompletionFlag == "PARTIAL"
        assert back.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        assert f"series {ds.SeriesInstanceUID}: {reason}" in comments(back)
        assert "pacs-triage result res-0001: status not_analysed" in comments(back)
        report = measurement_report(back)
        assert report.get_image_measurement_groups() == []

    def test_private_coding_scheme_is_declared(self, tmp_path: Path) -> None:
        ds = make_dataset()
        private = Code(scheme="99PTRIAGE", value="T001", meaning="Demonstration finding")
        back = write_and_check(
            build(study_result(ds.StudyInstanceUID, [finding(ds, private)]), [ds]), tmp_path
        )
        assert [item.CodingSchemeDesignator for item in back.CodingSchemeIdentificationSequence] == [
            "99PTRIAGE"
        ]

    def test_no_identifiers_in_the_content_tree(self) -> None:
        ds = make_dataset()
        sr = build(study_result(ds.StudyInstanceUID, [finding(ds)]), [ds])
        tree = str(sr.ContentSequence)
        for sentinel in (SENTINEL_NAME, SENTINEL_ID, SENTINEL_ACCESSION):
            assert sentinel not in tree

    def test_missing_source_is_a_clear_error(self) -> None:
        ds = make_dataset()
        absent = generate_uid()
        detection = Detection(sop_instance_uid=absent, frame=1, x0=1, y0=1, x1=5, y1=5, score=0.5)
        result = study_result(ds.StudyInstanceUID, [finding(ds, detections=[detection])])
        with pytest.raises(ValueError, match=f"missing from sources: {absent}"):
            build(result, [ds])

    def test_source_from_another_study_is_refused(self) -> None:
        ds, stranger = make_dataset(), make_dataset()
        result = study_result(ds.StudyInstanceUID, [finding(ds)])
        with pytest.raises(ValueError, match="not in study"):
            build(result, [ds, stranger])

    def test_frame_out_of_range_is_refused(self) -> None:
        ds = make_dataset()
        result = study_result(ds.StudyInstanceUID, [finding(ds, key_frame=2)])
        with pytest.raises(ValueError, match="frame 2 out of range"):
            build(result, [ds])

    def test_no_sources_is_refused(self) -> None:
        result = study_result(generate_uid(), [], status="failed")
        with pytest.raises(ValueError, match="at least one source"):
            build(result, [])
