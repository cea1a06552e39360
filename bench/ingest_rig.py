"""The ingest benches' rig: the CT series sent, the ``storescu`` senders and the receivers they send to.

Shared by ``bench_ingest.py`` (every receiver side by side) and ``ab_ingest.py`` (our service from two or
more trees, alternated). A receiver (:data:`Receiver`) is started fresh for each measurement and says where
it listens and which process it is (:class:`Listening`: ``send_cost`` reads that process's CPU). Needs DCMTK,
Orthanc and a C compiler (``scripts/install-peers``); TCP_NODELAY=1 is set for DCMTK and Orthanc (PEERS.md).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.peers.orthanc import Orthanc  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}

SHIM_C = r"""
/* fsync every regular file before it is closed: storescp made durable (it has no option for it). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>
static int regular(int fd) { struct stat st; return fd >= 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode); }
int close(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "close");
    if (regular(fd)) fsync(fd);
    return real(fd);
}
int fclose(FILE *f) {
    static int (*real)(FILE *);
    if (!real) real = (int (*)(FILE *))dlsym(RTLD_NEXT, "fclose");
    if (f && regular(fileno(f))) { fflush(f); fsync(fileno(f)); }
    return real(f);
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def compile_shim(work: Path) -> Path:
    """Compile the fsync-on-close shim (:data:`SHIM_C`)."""
    src, lib = work / "fsync_on_close.c", work / "fsync_on_close.so"
    src.write_text(SHIM_C)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(src), "-ldl"], check=True)
    return lib


def ct_slice(study: str, series: str, number: int, of: int, patient_name: str) -> Dataset:
    """Slice ``number`` of ``of`` of a 512 x 512 uncompressed CT series (16-bit, rescaled to HU), without
    its position, body part or pixels: what the benches' series share (``bench_memory.py`` too)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.Modality = "BENCH", patient_name, "CT"
    ds.InstanceNumber, ds.ImagesInAcquisition = number, of
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def ct_series(out: Path, n: int) -> list[Path]:
    """N uncompressed 512x512 CT slices of one series: the ingest payload (pixels are noise)."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    study, series = generate_uid(), generate_uid()
    pixels = rng.integers(0, 2000, size=(512, 512), dtype=np.uint16).tobytes()
    paths = []
    for i in range(n):
        ds = ct_slice(study, series, i + 1, n, "Bench^Ingest")
        ds.BodyPartExamined = "ABDOMEN"  # routed to no model: this run measures ingest only
        ds.ImagePositionPatient = [0, 0, float(i)]
        ds.PixelData = pixels
        path = out / f"IM{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(port: int, aet: str, shares: list[list[Path]]) -> list[float]:
    """Seconds each of ``len(shares)`` concurrent storescu processes took to send its share."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aet", f"BENCH{i}", "-aec", aet, "127.0.0.1", str(port), *map(str, share)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i, share in enumerate(shares)
    ]
    ends = [0.0] * len(procs)
    pending = dict(enumerate(procs))
    while pending:
        for i, proc in list(pending.items()):
            if proc.poll() is not None:
                ends[i] = time.perf_counter() - t0
                del pending[i]
        time.sleep(0.002)
    failed = [p.stderr.read().decode()[-500:] for p in procs if p.returncode and p.stderr]
    if failed:
        raise RuntimeError(f"storescu failed: {failed}")
    return ends


def split(paths: list[Path], n: int) -> list[list[Path]]:
    return [paths[i::n] for i in range(n)]


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


class Listening(NamedTuple):
    """A receiver started for one measurement: where it listens, and its process (:mod:`send_cost`)."""

    port: int
    aet: str
    pid: int


Receiver = Callable[[Path], contextlib.AbstractContextManager[Listening]]


def kept(work: Path, name: str) -> Path:
    """A new directory for one receiver's files, kept until the bench ends (``work`` is removed then).

    Why not removed after each run: on ext4 without a journal (this machine's root file system, and any
    mounted so), every file created scans past the inodes deleted in the last 60 s (300 s while their
    inode table block is dirty) before it takes one (``recently_deleted`` in fs/ext4/ialloc.c), so the
    receiver measured after a run's 600 files were removed paid for them: ~7 % of the machine's CPU in
    ``perf`` during our four-association runs, and more for ``storescp`` (bench/RESULTS.md, session 29)."""
    work.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=work, prefix=f"{name}-"))


def settle() -> None:
    """Before a measurement: what the previous receiver left in the page cache is written back now
    (``os.sync``), not during the next one's run (``storescp`` leaves ~300 MiB dirty per 600 instances)."""
    os.sync()


def storescp_receiver(shim: Path | None, *, ignore: bool = False) -> Receiver:
    @contextlib.contextmanager
    def run(work: Path) -> Iterator[Listening]:
        out = kept(work, "storescp")
        port = free_port()
        env = {**ENV, "LD_PRELOAD": str(shim)} if shim else ENV
        proc = subprocess.Popen(
            ["storescp", "-aet", "STORESCP", *(["--ignore"] if ignore else ["-od", str(out)]), str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(port, proc)
            yield Listening(port, "STORESCP", proc.pid)
        finally:
            proc.terminate()
            proc.wait()

    return run


@contextlib.contextmanager
def orthanc_receiver(work: Path) -> Iterator[Listening]:
    server = Orthanc.start(kept(work, "orthanc"), aet="ORTHANC")
    try:
        yield Listening(server.dicom_port, "ORTHANC", server.proc.pid)
    finally:
        server.stop()


class Service:
    """``pacs-triage serve`` as its own process, on fresh ports and a fresh data directory."""

    def __init__(self, work: Path, quiet: float, tree: Path = ROOT, **extra: str) -> None:
        self.http, self.dicom = free_port(), free_port()
        self.data = kept(work, "service")
        env = {
            **ENV,
            "PACS_TRIAGE_DATA_DIR": str(self.data),
            # each tree serves its own models: an older tree may not read newer cards
            "PACS_TRIAGE_MODELS_DIR": str(tree / "models"),
            "PACS_TRIAGE_DICOM__PORT": str(self.dicom),
            "PACS_TRIAGE_ASSEMBLY__QUIET_SECONDS": str(quiet),
            "PACS_TRIAGE_LOG_LEVEL": "WARNING",
            "PACS_TRIAGE_AUTH__OPEN": "true",
            **extra,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(self.http)],
            env=env,
            cwd=tree,
        )
        # Both ports first: the DICOM listener starts before uvicorn binds HTTP, and polling /healthz/ready
        # before the HTTP port listens was this bench's own race (a ConnectError).
        try:  # a start that times out (a loaded machine) must not leave the process behind
            wait_port(self.dicom, self.proc, 300)
            wait_port(self.http, self.proc, 300)
            self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.http}", timeout=30)
            deadline = time.monotonic() + 120
            while self.client.get("/healthz/ready").status_code != 200:
                if time.monotonic() > deadline:
                    raise TimeoutError("service never became ready")
                time.sleep(0.1)
        except BaseException:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise

    def wait_result(self, study_uid: str, timeout: float = 120, measured: bool = False) -> None:
        """Until the study's result is stored: ``Prefer: wait`` holds the request until the result wakes it
        (a 10 ms poll cost the service a third of a core and slowed the very analysis it timed). With
        ``measured``, until the result is not a measurements-pending one (a positive head CT's flag comes
        before its segmentation)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            asked = time.monotonic()
            r = self.client.get(f"/v1/studies/{study_uid}/result", headers={"Prefer": "wait=20"})
            if r.status_code == 200 and not (measured and r.json().get("measurements_pending")):
                return
            if time.monotonic() - asked < 1:  # a tree without the wait (--compare-tree): poll, 10 ms
                time.sleep(0.01)
        raise TimeoutError("no result")

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


def ours(tree: Path = ROOT, **env: str) -> Receiver:
    """``pacs-triage serve`` from ``tree``: this checkout, or another (``--compare-tree``)."""

    @contextlib.contextmanager
    def run(work: Path) -> Iterator[Listening]:
        service = Service(work, quiet=5.0, tree=tree, **env)
        try:
            yield Listening(service.dicom, "PACS_TRIAGE", service.proc.pid)
        finally:
            service.stop()

    return run
