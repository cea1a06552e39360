"""C-STORE ingest: our listener vs DCMTK ``storescp`` on the same files from ``storescu``, side by side.

1. **Ingest rate.** The same N-instance CT series (512x512, 16-bit, ~514 KiB each, as in PEERS.md) is sent
   by ``--associations`` concurrent ``storescu`` processes (1 and 4 by default) to (a) ``storescp -od DIR``
   (DCMTK writes each file, no fsync: it has no option for it) and (b) ``pacs-triage serve`` (each instance
   fsynced, its directory fsynced and its row committed with SQLite synchronous=FULL before the success
   status). Instances per second, best of ``--rounds`` alternating runs, ratio ours / storescp. Goal >= 1.0x.
2. **Time to flag.** From the moment ``storescu`` returns (the last instance acknowledged) to the study's
   result being available over REST, for ``--studies`` head CT series (32 slices with ImagesInAcquisition,
   so complete when full) and chest radiographs (no expected count: the quiet timer, set here to
   ``--quiet`` seconds, decides). p50 / p95.

Usage::

    .venv/bin/python bench/bench_ingest.py [--instances 1000] [--rounds 3] [--studies 10] [--quiet 1]

Needs DCMTK (``scripts/install-peers``). TCP_NODELAY=1 is set for DCMTK on both sides (PEERS.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.data.synthetic import generate_ct, generate_cxr  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ct_series(out: Path, n: int) -> list[Path]:
    """N uncompressed 512x512 CT slices of one series: the ingest payload (pixels are noise)."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    study, series = generate_uid(), generate_uid()
    pixels = rng.integers(0, 2000, size=(512, 512), dtype=np.uint16).tobytes()
    paths = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName, ds.Modality = "BENCH", "Bench^Ingest", "CT"
        ds.BodyPartExamined = "ABDOMEN"  # routed to no model: this run measures ingest only
        ds.InstanceNumber, ds.ImagesInAcquisition = i + 1, n
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, float(i)]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = 512
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels
        path = out / f"IM{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _storescu(port: int, aet: str, paths: list[Path], associations: int = 1) -> float:
    """Seconds for ``associations`` concurrent storescu processes to send every path between them."""
    shares = [paths[i::associations] for i in range(associations)]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aet", "BENCH", "-aec", aet, "127.0.0.1", str(port), *map(str, share)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for share in shares
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"storescu failed: {codes}")
    return time.perf_counter() - t0


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def _storescp_round(paths: list[Path], work: Path, associations: int) -> float:
    out = work / "storescp"
    out.mkdir()
    port = _free_port()
    proc = subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, proc)
        seconds = _storescu(port, "STORESCP", paths, associations)
    finally:
        proc.terminate()
        proc.wait()
    assert len(list(out.iterdir())) == len(paths)
    shutil.rmtree(out)
    return seconds


class Service:
    """``pacs-triage serve`` as its own process, on fresh ports and a fresh data directory."""

    def __init__(self, work: Path, quiet: float) -> None:
        self.http, self.dicom = _free_port(), _free_port()
        self.data = work / "service"
        env = {
            **ENV,
            "PACS_TRIAGE_DATA_DIR": str(self.data),
            "PACS_TRIAGE_MODELS_DIR": str(ROOT / "models"),
            "PACS_TRIAGE_DICOM__PORT": str(self.dicom),
            "PACS_TRIAGE_ASSEMBLY__QUIET_SECONDS": str(quiet),
            "PACS_TRIAGE_WORKER__POLL_SECONDS": "0.05",
            "PACS_TRIAGE_LOG_LEVEL": "WARNING",
            "PACS_TRIAGE_AUTH__OPEN": "true",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(self.http)],
            env=env,
            cwd=ROOT,
        )
        _wait_port(self.dicom, self.proc)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.http}", timeout=30)
        deadline = time.monotonic() + 120
        while self.client.get("/healthz/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("service never became ready")
            time.sleep(0.1)

    def wait_result(self, study_uid: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.client.get(f"/v1/studies/{study_uid}/result").status_code == 200:
                return
            time.sleep(0.01)
        raise TimeoutError("no result")

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.data, ignore_errors=True)


def _ours_round(paths: list[Path], work: Path, associations: int) -> float:
    service = Service(work, quiet=5.0)
    try:
        return _storescu(service.dicom, "PACS_TRIAGE", paths, associations)
    finally:
        service.stop()


def _time_to_flag(work: Path, n: int, quiet: float) -> dict[str, list[float]]:
    src = work / "ttf"
    ct_labels = generate_ct(src / "ct", n_patients=n, seed=3)
    cxr_labels = generate_cxr(src / "cxr", n_patients=n, seed=3)
    series: dict[str, list[Path]] = {}
    for line in ct_labels.read_text().splitlines()[1:]:
        file = line.split(",")[0]
        series.setdefault(str(Path(file).parent), []).append(src / "ct" / file)
    cxrs = [src / "cxr" / line.split(",")[0] for line in cxr_labels.read_text().splitlines()[1:]][:n]
    from pydicom import dcmread

    out: dict[str, list[float]] = {"ct (complete when full)": [], f"cr (quiet timer {quiet:g} s)": []}
    service = Service(work, quiet=quiet)
    try:
        for name, files in list(series.items())[:n]:
            ds = [dcmread(f) for f in files]
            folder = work / "ttf-send" / name
            folder.mkdir(parents=True)
            for i, d in enumerate(ds):
                d.ImagesInAcquisition = len(ds)
                d.save_as(folder / f"{i}.dcm", enforce_file_format=True)
            sent = sorted(folder.iterdir())
            _storescu(service.dicom, "PACS_TRIAGE", sent)
            t0 = time.perf_counter()
            service.wait_result(str(ds[0].StudyInstanceUID))
            out["ct (complete when full)"].append(time.perf_counter() - t0)
        for path in cxrs:
            folder = work / "ttf-send" / path.stem
            folder.mkdir(parents=True)
            shutil.copy(path, folder)
            _storescu(service.dicom, "PACS_TRIAGE", [folder / path.name])
            t0 = time.perf_counter()
            service.wait_result(str(dcmread(path, stop_before_pixels=True).StudyInstanceUID))
            out[f"cr (quiet timer {quiet:g} s)"].append(time.perf_counter() - t0)
    finally:
        service.stop()
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--quiet", type=float, default=1.0)
    parser.add_argument(
        "--associations", type=int, nargs="+", default=[1, 4], help="concurrent storescu associations"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        paths = _ct_series(work / "series", args.instances)
        size = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        print(f"{args.instances} CT instances of {size:.0f} KiB; best of {args.rounds} alternating rounds")
        for n in args.associations:
            theirs, ours = [], []
            for _ in range(args.rounds):
                theirs.append(_storescp_round(paths, work, n))
                ours.append(_ours_round(paths, work, n))
            best_theirs, best_ours = args.instances / min(theirs), args.instances / min(ours)
            print(
                f"  {n} association(s): storescp (no fsync) {best_theirs:6.0f}/s, "
                f"pacs-triage (fsync + commit) {best_ours:6.0f}/s, "
                f"ratio {best_ours / best_theirs:.2f}x (goal >= 1.0x)"
            )
        print(f"\ntime to flag, last instance acknowledged -> result over REST ({args.studies} studies each)")
        for kind, values in _time_to_flag(work, args.studies, args.quiet).items():
            print(
                f"  {kind:28s} p50 {statistics.median(values) * 1000:7.0f} ms   "
                f"p95 {_pct(values, 0.95) * 1000:7.0f} ms   (n={len(values)})"
            )


if __name__ == "__main__":
    main()
