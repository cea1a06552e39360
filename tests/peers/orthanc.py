"""A real Orthanc (the Debian package's /usr/sbin/Orthanc) as a PACS peer for end-to-end tests.

Each `Orthanc` is a private server: its own temporary config, storage, index, log and loopback ports, so tests
can run several side by side and never touch a system Orthanc. Orthanc 1.10 facts this relies on (see
../shared/PEERS.md): it needs TCP_NODELAY=1 in its environment or every C-STORE waits ~40 ms for a delayed
ACK; its DICOM port always listens on all interfaces (no bind address), so ports are chosen free on all
interfaces and HTTP stays local-only (`RemoteAccessAllowed: false`). It refuses (0xA700) instances lacking
StudyInstanceUID or SeriesInstanceUID, but 1.10.1 accepts ones without PatientID.

Use `orthanc_factory` (a fixture) or `Orthanc.start(...)` as a context manager:

    with Orthanc.start(tmp_path, modalities={"TRIAGE": ("TRIAGE", "127.0.0.1", port)}) as pacs:
        pacs.upload(data)
        pacs.store_to_modality("TRIAGE", pacs.instances())
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest

from tests.peers import free_port, log_tail

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def require_orthanc() -> None:
    """Skip (not fail) where the peer is absent: scripts/test installs it, so in CI it is always there."""
    if not ORTHANC_BIN.exists():
        pytest.skip(f"{ORTHANC_BIN} not installed: run scripts/install-peers (scripts/test does)")


class Orthanc:
    """One running Orthanc; stop it with `stop()` or by leaving the `with` block (both are idempotent)."""

    def __init__(
        self, *, aet: str, dicom_port: int, http_port: int, root: Path, proc: subprocess.Popen[bytes]
    ) -> None:
        self.aet = aet
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.root = root
        self.log_path = root / "orthanc.log"
        self.proc = proc
        self.client = httpx.Client(base_url=self.http_url, timeout=30.0)

    # --- life cycle -------------------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        tmp_dir: Path | str,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        lua: str | None = None,
        extra_config: Mapping[str, Any] | None = None,
        dicom_port: int | None = None,
        http_port: int | None = None,
    ) -> Orthanc:
        """Write a private config under `tmp_dir`, start Orthanc and wait until its REST API answers.

        `modalities` maps a name to (AET, host, port): Orthanc can C-STORE to those (`store_to_modality`)
        and, as DicomAlwaysAllowStore is on, anyone may C-STORE to it anyway. `lua` is the text of a Lua
        script (e.g. an `OnStoredInstance` that forwards). `extra_config` overrides any key. Ports left as
        None are picked free; if such a pick loses a race with another process, start retries new ports.
        """
        require_orthanc()
        root = Path(tmp_dir)
        root.mkdir(parents=True, exist_ok=True)
        attempts = 1 if dicom_port is not None and http_port is not None else 3
        for attempt in range(attempts):
            dport = dicom_port if dicom_port is not None else free_port()
            hport = http_port if http_port is not None else free_port()
            while hport == dport:
                hport = free_port()
            config = _config(root, aet, dport, hport, modalities, lua, extra_config)
            server = cls._spawn(root, aet, dport, hport, config)
            try:
                server._wait_ready()
                return server
            except _ExitedEarly:
                server.stop()
                if attempt + 1 == attempts:
                    raise RuntimeError(f"Orthanc exited at start-up:\n{log_tail(server.log_path)}") from None
            except BaseException:
                server.stop()
                raise
        raise AssertionError("unreachable")

    @classmethod
    def _spawn(cls, root: Path, aet: str, dport: int, hport: int, config: dict[str, Any]) -> Orthanc:
        config_path = root / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        env = {**os.environ, "TCP_NODELAY": "1"}
        log = (root / "orthanc.log").open("ab")
        try:
            # Same process group as pytest on purpose: a Ctrl-C on the test run reaches Orthanc too.
            proc = subprocess.Popen(
                [str(ORTHANC_BIN), str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=root,
                env=env,
            )
        finally:
            log.close()
        return cls(aet=aet, dicom_port=dport, http_port=hport, root=root, proc=proc)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise _ExitedEarly
            with contextlib.suppress(httpx.TransportError):
                if self.client.get("/system", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(
            f"Orthanc did not answer GET /system within {START_TIMEOUT_S:.0f} s:\n{log_tail(self.log_path)}"
        )

    def stop(self, *, graceful: bool = True) -> None:
        """Stop and reap the process; idempotent.

        Graceful: POST /tools/shutdown, then terminate, then kill. Orthanc 1.10 takes ~3.5 s to stop cleanly
        (its HTTP and DICOM servers poll for the stop flag), so `graceful=False` kills it at once: a crash
        for "the PACS went down" tests, and a fast teardown where the storage is thrown away anyway.
        """
        if self.proc.poll() is None:
            steps: tuple[Callable[[], None] | None, ...] = (self.proc.kill,)
            if graceful:
                with contextlib.suppress(httpx.HTTPError):
                    self.client.post("/tools/shutdown", timeout=2.0)
                steps = (None, self.proc.terminate, self.proc.kill)
            for signal_it in steps:
                if signal_it is not None:
                    signal_it()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=STOP_TIMEOUT_S / 2)
                    break
        self.proc.wait()
        self.client.close()

    def __enter__(self) -> Orthanc:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- addresses --------------------------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def peer_text(self) -> str:
        """How our service's config names a DICOM peer: AET@host:port."""
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    # --- REST helpers -----------------------------------------------------------------------------------

    def instances(self) -> list[str]:
        """Orthanc ids (not SOP Instance UIDs) of every stored instance."""
        return list(self._json("GET", "/instances"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """Tags by keyword, e.g. {"PatientID": "...", "Modality": "CR"}; sequences as lists of dicts."""
        return dict(self._json("GET", f"/instances/{instance_id}/simplified-tags"))

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file, byte for byte as Orthanc keeps it."""
        return self._request("GET", f"/instances/{instance_id}/file").content

    def find(self, level: str, query: Mapping[str, str]) -> list[str]:
        """Orthanc ids at `level` ("Patient", "Study", "Series", "Instance") matching DICOM-style `query`."""
        return list(self._json("POST", "/tools/find", json={"Level": level, "Query": dict(query)}))

    def wait_for_instances(self, n: int, timeout: float = 10.0) -> list[str]:
        """Poll until at least `n` instances are stored; return their ids, or fail with the log tail."""
        deadline = time.monotonic() + timeout
        while True:
            ids = self.instances()
            if len(ids) >= n:
                return ids
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"Orthanc holds {len(ids)} instances after {timeout} s, expected {n}:\n"
                    f"{log_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def upload(self, data: bytes) -> str:
        """Store a DICOM file over REST (no DICOM network involved); return its Orthanc instance id."""
        answer = self._json("POST", "/instances", content=data, headers={"Content-Type": "application/dicom"})
        return str(answer["ID"])

    def store_to_modality(self, modality: str, resource_ids: list[str]) -> dict[str, Any]:
        """C-STORE resources (any level) to a configured modality, synchronously; raises if it fails."""
        body = {"Resources": list(resource_ids), "Synchronous": True}
        return dict(self._json("POST", f"/modalities/{modality}/store", json=body))

    def delete_all(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        for patient in self._json("GET", "/patients"):
            self._request("DELETE", f"/patients/{patient}")

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.client.request(method, path, **kwargs)
        if response.is_error:
            raise AssertionError(f"Orthanc {method} {path} -> {response.status_code}: {response.text[:2000]}")
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()


class _ExitedEarly(Exception):
    """Orthanc exited before answering: usually a port taken between picking and binding it."""


def _config(
    root: Path,
    aet: str,
    dicom_port: int,
    http_port: int,
    modalities: Mapping[str, tuple[str, str, int]] | None,
    lua: str | None,
    extra_config: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The smallest config that makes a private, quiet, predictable Orthanc."""
    (root / "storage").mkdir(exist_ok=True)
    (root / "index").mkdir(exist_ok=True)
    config: dict[str, Any] = {
        "Name": f"pacs-triage-test-{aet}",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "DicomServerEnabled": True,
        "DicomAlwaysAllowStore": True,  # accept C-STORE from any AE, listed or not
        "DicomAlwaysAllowEcho": True,
        "DicomCheckCalledAet": False,
        "AuthenticationEnabled": False,
        "RemoteAccessAllowed": False,  # HTTP from loopback only
        "DicomModalities": {name: list(entry) for name, entry in (modalities or {}).items()},
        # Default 5 s: REST-initiated stores would hold the association open after sending, which makes
        # "the association ended" observations in tests lag by 5 s.
        "DicomAssociationCloseDelay": 0,
        "SaveJobs": False,  # no job history to replay across restarts on the same directories
        "ConcurrentJobs": 2,
        "WebDavEnabled": False,
        "HttpCompressionEnabled": False,
        "Plugins": [],  # never pick up the system's plugins (worklists, serve-folders)
    }
    if lua is not None:
        script = root / "script.lua"
        script.write_text(lua)
        config["LuaScripts"] = [str(script)]
    config.update(extra_config or {})
    return config


class OrthancFactory:
    """Starts Orthancs in numbered sub-directories of one temporary directory; stops them all at the end."""

    def __init__(self, tmp_dir: Path) -> None:
        self.tmp_dir = tmp_dir
        self.servers: list[Orthanc] = []

    def __call__(self, **kwargs: Any) -> Orthanc:
        """Same keywords as `Orthanc.start` (aet, modalities, lua, extra_config, dicom_port, http_port)."""
        server = Orthanc.start(self.tmp_dir / f"orthanc{len(self.servers)}", **kwargs)
        self.servers.append(server)
        return server

    def stop_all(self, *, graceful: bool = False) -> None:
        """Kill by default: the temporary storage is discarded, and a clean stop costs ~3.5 s per server."""
        for server in reversed(self.servers):
            server.stop(graceful=graceful)


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[OrthancFactory]:
    """`orthanc_factory(aet=..., modalities=...)` -> a running Orthanc, killed and reaped at teardown.

    Import it into a test module or conftest: `from tests.peers.orthanc import orthanc_factory`.
    """
    factory = OrthancFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()
