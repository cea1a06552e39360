"""Crash safety: ``pacs-triage serve`` killed with SIGKILL at random moments while DCMTK sends it a study set.

The promise under test, end to end with the real peers: an instance we acknowledged is never lost, every
complete study is analysed exactly once, and every result object reaches the PACS (Orthanc) once.

The study set is a 1,000-slice head CT series and a few dozen chest radiographs, every image carrying
ImagesInAcquisition, so each study is complete exactly when its last instance is stored (the quiet timer is
set to an hour and never fires): a study can only be analysed once it is whole, and so exactly once. The CR
studies are interleaved with the CT slices, so jobs, renders and deliveries run while the CT is still coming
in and the kills land in every stage. ``storescu -v`` says which files got a success status ("Received
Store Response (Success)" after "Sending file: PATH"); after each kill the files without one are sent again,
plus a few that were acknowledged already (duplicates must be harmless).

While a sender thread runs ``storescu`` in a loop, the test starts the service, waits a random time (a
quarter of the kills land during start-up, the rest after the API answers) and kills it with SIGKILL,
``kills`` times (half the starts hold each group commit of received rows back 0.3 s, so kills also land
between a C-STORE's success and its row), after one clean first start (a kill during the very first
start, while the schema is created, is the second test's). The last start is left to finish. Then, from
the database opened read-only, the data directory and Orthanc's REST API:

- every acknowledged SOP Instance UID has its row and its file, and the file parses;
- every study has exactly one job (``done``) and exactly one result; none is pending or running;
- every result was rendered; every output object has exactly one delivery, ``done``; Orthanc holds exactly
  the output objects of the database, each once;
- sending the whole set again afterwards is all successes and starts no new job.

Short form: 20 kills (about 2 minutes on 2 cores). Long form (``--long`` or ``PACS_TRIAGE_LONG_TESTS=1``):
100 kills. ``PACS_TRIAGE_CRASH_SEED`` replays one run's kill schedule. The figures are printed (``pytest -s``)
and collected in docs/reliability.md.

Besides the test, this module holds the small harness the other reliability tests share: :class:`Service`
(the real process on fixed ports, restartable on the same data), :func:`storescu_acked` and the generators.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, generate_uid

from tests.fixtures.tiny_models import write_tiny_models
from tests.peers import free_port, log_tail
from tests.peers.dcmtk import STORESCU, dcmtk_env, require_dcmtk
from tests.peers.orthanc import Orthanc, OrthancFactory
from tests.service.dicom_factory import make_dataset

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

LONG_ENV = "PACS_TRIAGE_LONG_TESTS"
COMMIT_DELAY = "PACS_TRIAGE_DICOM__COMMIT_DELAY_SECONDS"


def long_form(config: pytest.Config) -> bool:
    """The long forms run with ``--long`` (tests/reliability/conftest.py) or ``PACS_TRIAGE_LONG_TESTS=1``."""
    return bool(config.getoption("--long", default=False)) or os.environ.get(LONG_ENV, "") not in ("", "0")


def report(title: str, figures: dict[str, Any]) -> None:
    """Print the figures of a run (shown with ``pytest -s``; docs/reliability.md quotes them)."""
    sys.stdout.write(f"\n[reliability] {title}: {json.dumps(figures, sort_keys=True, default=str)}\n")
    sys.stdout.flush()


# ---- the service as a process ------------------------------------------------------------------------------


class Service:
    """``pacs-triage serve`` in its own process; ports and data directory fixed for the object's life.

    So it can be killed and started again on the same data, as after a crash. ``env`` overrides or adds
    ``PACS_TRIAGE_*`` settings. Every start appends to one log file under ``root`` (``log()``), with a
    marker line; the data directory is ``root/var`` unless ``data_dir`` says otherwise.
    """

    def __init__(self, root: Path, models_dir: Path, *, data_dir: Path | None = None, **env: str) -> None:
        self.root = root
        self.data_dir = data_dir or root / "var"
        self.http_port = free_port()
        self.dicom_port = free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        self.log_path = root / "serve.log"
        self.env = {
            **os.environ,
            "PACS_TRIAGE_MODELS_DIR": str(models_dir),
            "PACS_TRIAGE_DATA_DIR": str(self.data_dir),
            "PACS_TRIAGE_INFERENCE__PROVIDERS": "cpu",
            "PACS_TRIAGE_WORKER__POLL_SECONDS": "0.05",
            "PACS_TRIAGE_DICOM__HOST": "127.0.0.1",
            "PACS_TRIAGE_DICOM__PORT": str(self.dicom_port),
            "PACS_TRIAGE_AUTH__OPEN": "true",
            "PACS_TRIAGE_DELIVERY__BACKOFF_SECONDS": "0.2",
            "PACS_TRIAGE_DELIVERY__BACKOFF_MAX_SECONDS": "1",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "pacs-triage.db"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self) -> None:
        """Start the process and return at once (it is neither live nor ready yet)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"=== start {self.starts} ===\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "service",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.http_port),
                ],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[2],
            )

    def _wait(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"pacs-triage serve exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base}{path}", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"GET {path} never answered 200 within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.03)

    def wait_live(self, timeout: float = 60) -> None:
        """The API answers: the store is open, crashed work recovered, listener and workers started."""
        self._wait("/healthz/live", timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        self._wait("/healthz/ready", timeout)

    def start(self) -> Service:
        self.spawn()
        self.wait_ready()
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a power cut of the process (not of the machine)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), SIGKILL if it takes longer than 20 s. Idempotent."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def rss_kib(self) -> int:
        """VmRSS of the server process, KiB (/proc/<pid>/status)."""
        text = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.MULTILINE)
        assert match, text
        return int(match.group(1))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)

    def db(self) -> sqlite3.Connection:
        """The service's SQLite database, read-only (safe while the service runs: WAL readers never block)."""
        return sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with self.db() as conn:
            return conn.execute(sql, args).fetchall()

    def files_on_disk(self, expect: Iterable[str] = (), timeout: float = 60) -> set[str]:
        """SOP Instance UIDs of the instance files on disk; once they include ``expect``, or when ``timeout``
        has passed (the caller asserts on what it got). With slots (``dicom.journal``) a C-STORE is
        answered once its slot is durable and renamed into place in the background after the answer, so
        "answered" does not mean "in its file" yet; without them the files are there."""
        want = set(expect)
        deadline = time.monotonic() + timeout
        while True:
            found = {p.stem for p in (self.data_dir / "instances").rglob("*.dcm")}
            if want <= found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def tiny_models(root: Path) -> Path:
    """The three demonstration model names as tiny ONNX graphs (tests/fixtures/tiny_models.py)."""
    models = root / "models"
    write_tiny_models(models)
    return models


# ---- DICOM from DCMTK --------------------------------------------------------------------------------------

SUCCESS_LINE = "Received Store Response (Success)"
SENDING_PREFIX = "I: Sending file: "
_RESPONSE_RE = re.compile(r"Received Store Response \(([^)]*)\)")


@dataclass
class StoreRun:
    """One ``storescu -v`` run: its exit status, the files answered Success, and any other statuses."""

    returncode: int
    acked: list[Path]
    other_statuses: list[str]
    output: str


def storescu_acked(
    port: int,
    files: Iterable[Path],
    *,
    calling: str = "MODALITY",
    extra_args: Iterable[str] = (),
    timeout: float = 300,
) -> StoreRun:
    """Send ``files`` in one association; which ones got a success status, from the verbose log.

    DCMTK 3.6.7 prints ``I: Sending file: PATH`` before each C-STORE-RQ and ``I: Received Store Response
    (Success)`` (or another status in the brackets) for its response. A file whose response never came (the
    association died) is not acknowledged. A run cut short by ``timeout`` still reports what it saw.
    """
    require_dcmtk()
    paths = [str(f) for f in files]
    cmd = [str(STORESCU), "-v", "-aet", calling, "-aec", "PACS_TRIAGE", "-to", "5", "-ta", "10", "-td", "30"]
    cmd += [*extra_args, "127.0.0.1", str(port), *paths]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    acked: list[Path] = []
    other: list[str] = []
    current: str | None = None
    for line in out.splitlines():
        if line.startswith(SENDING_PREFIX):
            current = line[len(SENDING_PREFIX) :].strip()
        elif (match := _RESPONSE_RE.search(line)) is not None:
            if match.group(1) == "Success" and current is not None:
                acked.append(Path(current))
            elif match.group(1) != "Success":
                other.append(f"{current}: {match.group(1)}")
            current = None
    return StoreRun(proc.returncode, acked, other, out)


# ---- synthetic studies -------------------------------------------------------------------------------------


def head_ct_series(
    out: Path, n: int, size: int = 128, study_uid: str | None = None, bleed: bool = False
) -> list[Path]:
    """``n`` head CT slices of one new series (routed to ct-hemorrhage), ImagesInAcquisition = ``n``;
    with ``bleed``, a block at 80 HU on the middle slices, which the tiny segmentation model measures."""
    out.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid, frame_of_reference = generate_uid(), generate_uid()
    pixels = np.full((size, size), 1084, dtype=np.uint16)  # 60 HU
    pixels[size // 4 : size // 2, size // 4 : size // 2] = 1094
    paths = []
    for i in range(n):
        if bleed and i == n // 2 - 1:
            pixels = pixels.copy()
            pixels[size // 2 : size // 2 + 10, size // 2 : size // 2 + 6] = 1104  # 80 HU
        elif bleed and i == n // 2 + 1:
            pixels = pixels.copy()
            pixels[size // 2 : size // 2 + 10, size // 2 : size // 2 + 6] = 1084
        ds = make_dataset(
            study_uid=study_uid,
            series_uid=series_uid,
            modality="CT",
            body_part="HEAD",
            sop_class=CTImageStorage,
            rows=size,
            columns=size,
            instance_number=i + 1,
            position_z=float(i),
            pixels=pixels,
        )
        ds.ImagesInAcquisition = n
        if bleed:  # measurable (0.5 mm pixels, slices 1 mm apart by their positions), and a SEG's source
            ds.PixelSpacing = [0.5, 0.5]
            ds.FrameOfReferenceUID, ds.SliceThickness = frame_of_reference, 1.0
        path = out / f"CT{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def chest_file(path: Path, *, study_uid: str | None = None, complete: bool = True) -> Path:
    """One chest radiograph as its own study; ``complete`` sets ImagesInAcquisition 1 (no quiet timer)."""
    pixels = np.zeros((64, 64), dtype=np.uint16)
    pixels[:, 32:] = 4000
    pixels[8:20, 8:20] = 4000
    ds = make_dataset(study_uid=study_uid, pixels=pixels)
    if complete:
        ds.ImagesInAcquisition = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def orthanc_sop_uids(pacs: Orthanc) -> Counter[str]:
    """SOP Instance UID → how many Orthanc instances carry it (Orthanc ids hash the UIDs: at most 1)."""
    answer = pacs.client.get("/instances", params={"expand": ""}, timeout=60)
    answer.raise_for_status()
    return Counter(str(i["MainDicomTags"]["SOPInstanceUID"]) for i in answer.json())


# ---- the crash test ----------------------------------------------------------------------------------------


@dataclass
class Sender:
    """Sends until every file got a success status, through kills: a thread running storescu in a loop."""

    port: int
    files: list[Path]
    chunk: int = 250
    duplicates: int = 10
    seed: int = 0
    acked: set[Path] = field(default_factory=set)
    runs: int = 0
    failed_runs: int = 0
    duplicates_sent: int = 0
    other_statuses: list[str] = field(default_factory=list)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="storescu-sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        rng = random.Random(self.seed)
        try:
            while not self._stop.is_set():
                pending = [f for f in self.files if f not in self.acked]
                if not pending:
                    return
                again = rng.sample(sorted(self.acked), min(self.duplicates, len(self.acked)))
                run = storescu_acked(self.port, pending[: self.chunk] + again)
                self.runs += 1
                self.duplicates_sent += len(again)
                self.acked.update(run.acked)
                self.other_statuses += run.other_statuses
                if run.returncode != 0:
                    self.failed_runs += 1
                    self._stop.wait(0.1)  # the service is down or restarting
        except BaseException as exc:  # reported by the test
            self.error = exc


def _kill_schedule(svc: Service, kills: int, rng: random.Random, sender: Sender) -> dict[str, int]:
    """Start and SIGKILL the service ``kills`` times; returns what was going on at the kills.

    A quarter of the kills land during start-up (imports, store open, recovery, warm-up); the others at a
    random moment after the API answers, when the database says what was in flight (read just before).
    """
    where: Counter[str] = Counter()
    for _ in range(kills):
        # Half the starts hold each group commit 0.3 s: more kills land between a C-STORE's success and
        # its row, which the next start's re-index must repair (test_crash_window.py holds it open).
        widened = rng.random() < 0.5
        svc.env[COMMIT_DELAY] = "0.3" if widened else "0"
        svc.spawn()
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0.05, 1.5))
            where["during start-up"] += 1
        else:
            svc.wait_live()
            time.sleep(rng.uniform(0.0, 2.5))
            ((running,),) = svc.query("SELECT COUNT(*) FROM jobs WHERE state = 'running'")
            ((outbox,),) = svc.query(
                "SELECT (SELECT COUNT(*) FROM results WHERE rendered_at IS NULL)"
                " + (SELECT COUNT(*) FROM deliveries WHERE state IN ('pending', 'sending'))"
            )
            where["while serving"] += 1
            where["with instances still to acknowledge"] += len(sender.acked) < len(sender.files)
            where["with a job running"] += running > 0
            where["with renders or deliveries outstanding"] += outbox > 0
            where["with rows held back 0.3 s after their success"] += widened
        svc.kill()
        time.sleep(rng.uniform(0.0, 0.3))
    return dict(where)


def _settled(svc: Service) -> bool:
    ((jobs,),) = svc.query("SELECT COUNT(*) FROM jobs WHERE state IN ('pending', 'running')")
    ((unrendered,),) = svc.query("SELECT COUNT(*) FROM results WHERE rendered_at IS NULL")
    ((sending,),) = svc.query("SELECT COUNT(*) FROM deliveries WHERE state IN ('pending', 'sending')")
    return jobs == 0 and unrendered == 0 and sending == 0


def _wait_settled(svc: Service, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _settled(svc):
        assert time.monotonic() < deadline, f"work still outstanding after {timeout} s:\n{svc.log_tail()}"
        time.sleep(0.2)


def _recovered_counts(log: str) -> tuple[int, int]:
    """(jobs reset to pending, deliveries to send again) summed over every start, from the service log."""
    jobs = sum(int(n) for n in re.findall(r"(\d+) job\(s\) left running .* reset to pending", log))
    sends = sum(int(n) for n in re.findall(r"(\d+) delivery\(ies\) cut short", log))
    return jobs, sends


def _reindexed(log: str) -> int:
    """Acknowledged instances given their row by the start-up re-index, summed over every start."""
    return sum(int(n) for n in re.findall(r"re-indexed (\d+) instance file\(s\)", log))


def test_sigkill_at_random_moments_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, orthanc_factory: OrthancFactory, pytestconfig: pytest.Config
) -> None:
    long = long_form(pytestconfig)
    kills = 100 if long else 20
    n_cr = 150 if long else 40
    seed = int(os.environ.get("PACS_TRIAGE_CRASH_SEED") or random.SystemRandom().randrange(1_000_000))
    t_start = time.monotonic()

    ct = head_ct_series(tmp_path / "send" / "ct", 1000)
    crs = [chest_file(tmp_path / "send" / "cr" / f"CR{i:04d}.dcm") for i in range(n_cr)]
    files: list[Path] = []
    every = max(1, len(ct) // (n_cr + 1))
    for i, path in enumerate(ct):  # CR studies between the CT slices: every stage busy while the CT arrives
        files.append(path)
        if i % every == every - 1 and crs:
            files.append(crs.pop())
    files += crs
    uid_of = {f: sop_uid(f) for f in files}
    study_of = {f: str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
    studies = set(study_of.values())

    pacs = orthanc_factory()
    svc = Service(
        tmp_path,
        tiny_models(tmp_path),
        PACS_TRIAGE_ASSEMBLY__QUIET_SECONDS="3600",  # complete only when full (ImagesInAcquisition)
        PACS_TRIAGE_INFERENCE__DEBUG_DELAY_MS="600",  # jobs last long enough to be killed in the middle
        PACS_TRIAGE_DELIVERY__DESTINATIONS=json.dumps([pacs.peer_text]),
        PACS_TRIAGE_DELIVERY__MAX_ATTEMPTS="1000",
    )
    sender = Sender(svc.dicom_port, files, seed=seed)
    with svc:
        # One clean first start: a kill during the very first start is test_sigkill_during_first_start's.
        svc.start()
        svc.kill()
        sender.start()
        where = _kill_schedule(svc, kills, random.Random(seed), sender)
        t_kills = time.monotonic() - t_start
        svc.env[COMMIT_DELAY] = "0"
        svc.start()
        assert sender.join(180), (
            f"the sender did not finish: {len(sender.acked)} of {len(files)} acknowledged"
        )
        assert sender.error is None, repr(sender.error)
        _wait_settled(svc, 120)

        # 1. Every acknowledged instance is stored: row, file, parseable, same SOP Instance UID.
        rows = dict(svc.query("SELECT sop_instance_uid, path FROM instances"))
        acked_uids = {uid_of[f] for f in sender.acked}
        assert acked_uids == set(uid_of.values())  # the sender finished: everything was acknowledged
        missing = sorted(u for u in acked_uids if u not in rows)
        assert not missing, f"{len(missing)} acknowledged instances have no row, e.g. {missing[:3]}"
        instances_dir = svc.data_dir / "instances"
        for uid in acked_uids:
            stored = dcmread(instances_dir / rows[uid])
            assert stored.SOPInstanceUID == uid and len(stored.PixelData) > 0
        assert sender.other_statuses == [], sender.other_statuses[:5]

        # 2. Every study: one job, done; one result, not failed; the CT analysed by ct-hemorrhage.
        jobs = svc.query("SELECT study_uid, state, attempts FROM jobs")
        assert Counter(s for s, _, _ in jobs) == Counter(dict.fromkeys(studies, 1)), "one job per study"
        assert {state for _, state, _ in jobs} == {"done"}
        results = svc.query("SELECT study_uid, body, rendered_at FROM results")
        per_study = Counter(s for s, _, _ in results)
        assert per_study == Counter(dict.fromkeys(studies, 1)), [s for s, n in per_study.items() if n != 1]
        bodies = {s: json.loads(b) for s, b, _ in results}
        assert {b["status"] for b in bodies.values()} == {"complete"}
        ct_result = bodies[study_of[ct[0]]]
        assert [f["model"] for f in ct_result["findings"]] == ["ct-hemorrhage"]
        assert httpx.get(f"{svc.base}/v1/studies/{study_of[ct[0]]}/result").json() == ct_result

        # 3. Every result rendered once; each object delivered once; Orthanc holds exactly those, once each.
        outputs = svc.query(
            "SELECT o.sop_instance_uid, o.result_id, d.state, d.attempts FROM outputs o "
            "LEFT JOIN deliveries d ON d.sop_instance_uid = o.sop_instance_uid"
        )
        assert {state for _, _, state, _ in outputs} == {"done"}
        assert Counter(u for u, _, _, _ in outputs).most_common(1)[0][1] == 1
        per_result = Counter(r for _, r, _, _ in outputs)
        assert len(per_result) == len(studies) and set(per_result.values()) == {2}  # SR + preview each
        in_pacs = orthanc_sop_uids(pacs)
        assert set(in_pacs) == {u for u, _, _, _ in outputs}
        assert set(in_pacs.values()) == {1}

        # 4. The whole set once more, after the fact: all successes, no new job, no new result.
        again = storescu_acked(svc.dicom_port, files)
        assert again.returncode == 0 and len(again.acked) == len(files), again.output[-2000:]
        time.sleep(1.0)
        assert len(svc.query("SELECT id FROM jobs")) == len(studies)
        assert len(svc.query("SELECT result_id FROM results")) == len(studies)

        # Figures (and leftovers a crash may leave: never data, at most unreferenced files).
        jobs_reset, deliveries_resent = _recovered_counts(svc.log())
        on_disk = {p.stem for p in instances_dir.rglob("*.dcm")}
        outputs_dir = svc.data_dir / "outputs"
        out_rows = {u for u, _, _, _ in outputs}
        figures = {
            "seed": seed,
            "kills": kills,
            "kills_by_moment": where,
            "instances_sent": len(files),
            "instances_acknowledged": len(acked_uids),
            "instances_stored": len(rows),
            "storescu_runs": sender.runs,
            "storescu_runs_cut_short": sender.failed_runs,
            "duplicates_resent": sender.duplicates_sent + len(files),
            "studies": len(studies),
            "results": len(results),
            "jobs_rerun_after_kill": sum(1 for _, _, a in jobs if a > 1),
            "jobs_reset_to_pending_at_start": jobs_reset,
            "instances_reindexed_at_start": _reindexed(svc.log()),
            "deliveries_resent_after_kill": deliveries_resent,
            "objects_delivered": len(outputs),
            "objects_in_orthanc": sum(in_pacs.values()),
            "delivery_attempts_max": max(a for _, _, _, a in outputs),
            "orphan_instance_files": len(on_disk - set(rows)),
            "orphan_incoming_tmp_files": len(list(instances_dir.rglob(".incoming-*"))),
            "orphan_output_files": len({p.stem for p in outputs_dir.rglob("*.dcm")} - out_rows),
            "seconds_kill_phase": round(t_kills, 1),
            "seconds_total": round(time.monotonic() - t_start, 1),
        }
        report("crash", figures)


ROUNDS_FIRST_START = 6


def test_sigkill_during_first_start_then_restart(tmp_path: Path) -> None:
    """The very first start creates the schema; a kill in the middle of that must not brick the data dir.

    The service is killed a few milliseconds after its database file appears (while the schema is being
    created and stamped), on a fresh data directory each round; the next start must become ready.
    """
    models = tiny_models(tmp_path)
    rng = random.Random(int(os.environ.get("PACS_TRIAGE_CRASH_SEED") or 1))
    states: Counter[str] = Counter()
    for i in range(ROUNDS_FIRST_START):
        svc = Service(tmp_path / f"round{i}", models)
        svc.root.mkdir()
        with svc:
            svc.spawn()
            deadline = time.monotonic() + 30
            while not svc.db_path.exists():
                assert time.monotonic() < deadline, svc.log_tail()
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.06))
            svc.kill()
            with sqlite3.connect(svc.db_path) as conn:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            stamped = "alembic_version" in tables and bool(
                sqlite3.connect(svc.db_path).execute("SELECT * FROM alembic_version").fetchall()
            )
            states["stamped" if stamped else "tables, no stamp" if tables else "empty"] += 1
            svc.spawn()
            svc.wait_ready()
    report(
        "kill during first start", {"rounds": ROUNDS_FIRST_START, "database state at the kill": dict(states)}
    )
