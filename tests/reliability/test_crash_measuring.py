"""SIGKILL between a positive head CT's flag and its measured result.

A finding that a segmentation measures is stored first, as a measurements-pending result of its job (the
flag: on the worklist, answered by GET .../result), and the measured result follows in the same job
(service/worker.py). ``inference.debug_measure_delay_ms`` holds a job between the two, so the kill lands
in that window every time; the database read before the kill shows it. After a normal restart:

- the job ran again from the start and the study has exactly one final (measured) result, with its
  segment, superseding the newest measurements-pending one; no job is pending or running;
- the PACS (Orthanc) holds exactly one SR and one SEG of ours for the study, both of the measured result:
  a measurements-pending result is never rendered, before the kill or after it.

DCMTK ``storescu`` sends the series, as a modality would.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from tests.fixtures.tiny_seg_model import write_tiny_seg_model
from tests.peers.orthanc import OrthancFactory
from tests.reliability.test_crash import Service, head_ct_series, report, storescu_acked, tiny_models
from tests.reliability.test_crash_window import _wait

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
HOLD = "PACS_TRIAGE_INFERENCE__DEBUG_MEASURE_DELAY_MS"


def test_sigkill_between_the_flag_and_the_measured_result(
    tmp_path: Path, orthanc_factory: OrthancFactory
) -> None:
    models = tiny_models(tmp_path)
    write_tiny_seg_model(models)
    ct = head_ct_series(tmp_path / "send" / "ct", 8, bleed=True)
    study = str(dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    pacs = orthanc_factory()
    svc = Service(
        tmp_path,
        models,
        PACS_TRIAGE_ASSEMBLY__QUIET_SECONDS="3600",  # complete only when full (ImagesInAcquisition)
        PACS_TRIAGE_DELIVERY__DESTINATIONS=json.dumps([pacs.peer_text]),
        data_dir=None,  # the default; named so that the ** below cannot be taken for it
        **{HOLD: "600000"},
    )
    with svc:
        # 1. The flag stored, the measurement held: then SIGKILL.
        svc.start()
        sent = storescu_acked(svc.dicom_port, ct)
        assert sent.returncode == 0 and len(sent.acked) == len(ct), sent.output[-2000:]
        pending = "SELECT result_id FROM results WHERE measurements_pending"
        _wait(lambda: bool(svc.query(pending)), "the measurements-pending result", svc)
        flags = svc.query(pending)
        running = svc.query("SELECT state, result_id FROM jobs")
        assert running == [("running", flags[0][0])], running  # the job goes on: it measures
        answered = httpx.get(f"{svc.base}/v1/studies/{study}/result", timeout=10)
        assert answered.status_code == 200 and answered.json()["measurements_pending"], answered.text
        assert answered.json()["priority"] == "stat"  # the flag, before the measurement
        svc.kill()

        # 2. A normal restart: the job runs again from the start and stores its measured result.
        svc.env[HOLD] = "0"
        svc.start()
        final = "SELECT result_id, body FROM results WHERE NOT measurements_pending"
        _wait(
            lambda: (
                not svc.query("SELECT id FROM jobs WHERE state IN ('pending', 'running')")
                and bool(svc.query(final))
            ),
            "the measured result",
            svc,
        )
        ((result_id, body),) = svc.query(final)
        result = json.loads(body)
        (finding,) = [f for f in result["findings"] if f["model"] == "ct-hemorrhage"]
        (segment,) = finding["segments"]
        assert finding["positive"] and segment["frames"] and segment["volume_ml"] > 0
        flags = [r for (r,) in svc.query(pending + " ORDER BY created_at")]
        assert len(flags) == 2 and result["supersedes"] == flags[-1]  # one before the kill, one after
        assert svc.query("SELECT state, result_id FROM jobs") == [("done", result_id)]

        # 3. The PACS: one SR and one SEG of ours, the measured result's (never the flag's).
        def ours() -> list[str]:
            classes = []
            for iid in pacs.find("Instance", {"StudyInstanceUID": study}):
                tags = pacs.instance_tags(iid)
                if tags.get("Manufacturer") == "pacs-triage":
                    classes.append(str(tags.get("SOPClassUID")))
            return sorted(classes)

        _wait(lambda: SR_CLASS in ours() and SEG_CLASS in ours(), "the SR and SEG in Orthanc", svc)
        _wait(lambda: not svc.query("SELECT id FROM deliveries WHERE state != 'done'"), "every delivery", svc)
        outputs = svc.query("SELECT DISTINCT result_id FROM outputs")
        assert outputs == [(result_id,)], outputs
        found = ours()
        assert found.count(SR_CLASS) == 1 and found.count(SEG_CLASS) == 1, found
        report(
            "kill between the flag and the measured result",
            {"measurements-pending results": len(flags), "our objects in Orthanc": len(found)},
        )
