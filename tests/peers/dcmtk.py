"""DCMTK (the Debian package's storescp, echoscu, storescu) as real DICOM peers for end-to-end tests.

Every process gets ``TCP_NODELAY=1`` in its environment: DCMTK leaves Nagle on otherwise and each C-STORE
waits ~40 ms for a delayed ACK (../shared/PEERS.md). storescp 3.6.7 cannot bind one address (it listens on
all interfaces), so ports are picked free on all interfaces and tests talk to it on 127.0.0.1.

A receiver, stopped when the block ends (or at fixture teardown)::

    with StoreSCP.start(tmp_path / "scp", aet="PACS") as scp:      # or: scp = storescp_factory(aet="PACS")
        send(Peer.parse(scp.peer_text), paths)
        files = scp.wait_for_files(3)                                # what arrived, as written by storescp

By default it accepts every transfer syntax DCMTK knows (``+xa``) and writes what it received bit for bit
(``+B``); ``accept_all=False`` gives DCMTK's default (uncompressed only), ``extra_args`` anything else from
``storescp --help`` (``--refuse``, ``--abort-after``, ``--sleep-during 5``...). The senders::

    echoscu(scp.port, aet="PACS").returncode == 0
    storescu(scp.port, [file_or_dir, ...], aet="PACS")   # plain storescu: uncompressed files only

Import the fixture into a test module or conftest: ``from tests.peers.dcmtk import storescp_factory``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import pytest

from tests.peers import free_port, log_tail

STORESCP = Path("/usr/bin/storescp")
ECHOSCU = Path("/usr/bin/echoscu")
STORESCU = Path("/usr/bin/storescu")
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0

__all__ = [
    "StoreSCP",
    "StoreSCPFactory",
    "dcmtk_env",
    "echoscu",
    "free_port",
    "require_dcmtk",
    "storescp_factory",
    "storescu",
]


def require_dcmtk() -> None:
    """Skip (not fail) where DCMTK is absent: scripts/test installs it, so in CI it is always there."""
    missing = [str(p) for p in (STORESCP, ECHOSCU, STORESCU) if not p.exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: run scripts/install-peers (scripts/test does)")


def dcmtk_env() -> dict[str, str]:
    """The environment every DCMTK process should run with (Nagle off)."""
    return {**os.environ, "TCP_NODELAY": "1"}


class StoreSCP:
    """One running storescp writing into ``out_dir``; ``stop()`` or leaving the ``with`` block ends it."""

    def __init__(self, *, aet: str, port: int, out_dir: Path, log_path: Path, proc: subprocess.Popen[bytes]):
        self.aet = aet
        self.port = port
        self.out_dir = out_dir
        self.log_path = log_path
        self.proc = proc

    @classmethod
    def start(
        cls,
        tmp_dir: Path | str,
        *,
        aet: str = "STORESCP",
        port: int | None = None,
        accept_all: bool = True,
        bit_preserving: bool = True,
        extra_args: Sequence[str] = (),
    ) -> StoreSCP:
        """Start storescp and wait until it accepts TCP connections.

        Received files go to ``tmp_dir/received`` (named ``<modality>.<SOP Instance UID>``), the verbose log
        to ``tmp_dir/storescp.log``. A port left None is picked free; if another process takes it first,
        start retries with new ports.
        """
        require_dcmtk()
        root = Path(tmp_dir)
        out_dir = root / "received"
        out_dir.mkdir(parents=True, exist_ok=True)
        args = ["-v", "-dhl", "-aet", aet, "-od", str(out_dir)]
        args += ["+xa"] if accept_all else []
        args += ["+B"] if bit_preserving else []
        args += list(extra_args)
        attempts = 1 if port is not None else 3
        for attempt in range(attempts):
            chosen = port if port is not None else free_port()
            log_path = root / "storescp.log"
            with log_path.open("ab") as log:
                # Same process group as pytest on purpose: a Ctrl-C on the test run reaches storescp too.
                proc = subprocess.Popen(
                    [str(STORESCP), *args, str(chosen)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=dcmtk_env(),
                )
            server = cls(aet=aet, port=chosen, out_dir=out_dir, log_path=log_path, proc=proc)
            try:
                if server._wait_ready():
                    return server
            except BaseException:
                server.stop()
                raise
            server.stop()
            if attempt + 1 == attempts:
                raise RuntimeError(f"storescp exited at start-up:\n{log_tail(log_path)}")
        raise AssertionError("unreachable")

    def _wait_ready(self) -> bool:
        """True once the port accepts; False if storescp exited (port taken). A bare connect is harmless."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
            time.sleep(0.02)
        tail = log_tail(self.log_path)
        raise RuntimeError(f"storescp did not listen within {START_TIMEOUT_S:.0f} s:\n{tail}")

    @property
    def peer_text(self) -> str:
        """How our code names this peer: ``AET@127.0.0.1:port`` (``Peer.parse`` reads it)."""
        return f"{self.aet}@127.0.0.1:{self.port}"

    def files(self) -> list[Path]:
        """Files received so far, sorted by name. Each is complete once its sender had the C-STORE-RSP."""
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())

    def wait_for_files(self, n: int, timeout: float = 10.0) -> list[Path]:
        """Poll until at least ``n`` files arrived; return them, or fail with the log tail."""
        deadline = time.monotonic() + timeout
        while len(found := self.files()) < n:
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"storescp received {len(found)} files after {timeout} s, expected {n}:\n{self.log()}"
                )
            time.sleep(0.02)
        return found

    def log(self, lines: int = 40) -> str:
        """The last lines of storescp's verbose log (for assertion messages)."""
        return log_tail(self.log_path, lines)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; always reaps the process. Idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> StoreSCP:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class StoreSCPFactory:
    """Starts storescps in numbered sub-directories of one temporary directory; stops them all at the end."""

    def __init__(self, tmp_dir: Path) -> None:
        self.tmp_dir = tmp_dir
        self.servers: list[StoreSCP] = []

    def __call__(self, **kwargs: object) -> StoreSCP:
        """Same keywords as ``StoreSCP.start`` (aet, port, accept_all, bit_preserving, extra_args)."""
        server = StoreSCP.start(self.tmp_dir / f"storescp{len(self.servers)}", **kwargs)  # type: ignore[arg-type]
        self.servers.append(server)
        return server

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            server.stop()


@pytest.fixture
def storescp_factory(tmp_path: Path) -> Iterator[StoreSCPFactory]:
    """``storescp_factory(aet=..., extra_args=[...])`` → a running StoreSCP, stopped at teardown."""
    factory = StoreSCPFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    require_dcmtk()
    return subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout, check=False)


def echoscu(
    port: int,
    *,
    aet: str = "STORESCP",
    calling_ae: str = "ECHOSCU",
    host: str = "127.0.0.1",
    timeout: float = 10.0,
) -> subprocess.CompletedProcess[str]:
    """Run DCMTK echoscu against ``aet@host:port``; returncode 0 means the C-ECHO succeeded."""
    secs = str(max(1, round(timeout)))
    return _run(
        [str(ECHOSCU), "-aet", calling_ae, "-aec", aet, "-to", secs, "-ta", secs, host, str(port)],
        timeout + 5,
    )


def storescu(
    port: int,
    files: Sequence[Path | str],
    *,
    aet: str = "STORESCP",
    calling_ae: str = "STORESCU",
    host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run DCMTK storescu: files and directories (scanned recursively), one association, go on after failures.

    Plain storescu proposes uncompressed transfer syntaxes only and fails compressed files (PEERS.md).
    """
    paths = [str(f) for f in files]
    scan = ["+sd", "+r"] if any(Path(f).is_dir() for f in paths) else []
    cmd = [str(STORESCU), "-nh", *scan, "-aet", calling_ae, "-aec", aet, *extra_args, host, str(port), *paths]
    return _run(cmd, timeout)
