"""``pacs-triage`` command line: ``serve`` runs the HTTP service under uvicorn, ``version`` prints it.

``echo`` and ``send`` are the DICOM client (:mod:`service.deliver.scu`) by hand: check that the PACS
answers our AE title, and C-STORE files to it. They import pynetdicom only when run (``version`` stays fast).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.deliver.scu import Peer

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.config:
        os.environ["PACS_TRIAGE_CONFIG"] = args.config
    from service.app import create_app
    from service.config import Settings
    from service.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level)
    host = args.host or settings.api.host
    port = args.port if args.port is not None else settings.api.port
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, access_log=False)
    return 0


def _version(_args: argparse.Namespace) -> int:
    from importlib.metadata import PackageNotFoundError, version

    try:  # not service.app.__version__: importing the app (ORT, pynetdicom) takes a second
        text = version("pacs-triage")
    except PackageNotFoundError:
        text = "0.0.0+unknown"
    sys.stdout.write(f"pacs-triage {text}\n")
    return 0


def _peer(text: str) -> Peer:
    """argparse type for ``AE@host:port``: a bad value is a usage error that says what is expected."""
    from service.deliver.scu import Peer

    try:
        return Peer.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _echo(args: argparse.Namespace) -> int:
    from service.deliver.scu import DicomPeerError, echo

    try:
        result = echo(args.peer, calling_ae=args.calling_ae, timeout=args.timeout)
    except (DicomPeerError, ValueError) as exc:  # ValueError: a bad --calling-ae
        sys.stderr.write(f"C-ECHO failed: {exc}\n")
        return 1
    if not result.ok:
        sys.stderr.write(f"C-ECHO to {args.peer} failed: status 0x{result.status:04X}\n")
        return 1
    sys.stdout.write(f"C-ECHO to {args.peer}: success ({result.seconds * 1000:.0f} ms)\n")
    return 0


def _dicom_files(paths: Sequence[Path], recursive: bool) -> tuple[list[Path], list[tuple[Path, str]]]:
    """DICOM Part 10 files under ``paths`` (by the "DICM" marker, PS3.10 7.1), and what was skipped, why."""
    found: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for path in paths:
        candidates = sorted(path.rglob("*") if recursive else path.glob("*")) if path.is_dir() else [path]
        for f in candidates:
            if not f.is_file():
                continue
            if f.name.upper() == "DICOMDIR":
                skipped.append((f, "a DICOMDIR (media index), not an instance"))
                continue
            try:
                with f.open("rb") as fh:
                    head = fh.read(132)
            except OSError as exc:
                skipped.append((f, f"unreadable ({exc.strerror})"))
                continue
            if head[128:132] == b"DICM":
                found.append(f)
            else:
                skipped.append((f, "not a DICOM Part 10 file"))
    return found, skipped


def _send(args: argparse.Namespace) -> int:
    import time

    from service.deliver.scu import DicomPeerError, send

    missing = [p for p in args.paths if not p.exists()]
    if missing:
        sys.stderr.write(f"no such file or directory: {', '.join(map(str, missing))}\n")
        return 1
    files, skipped = _dicom_files(args.paths, args.recursive)
    for path, why in skipped:
        sys.stderr.write(f"skipped {path}: {why}\n")
    if not files:
        sys.stderr.write(f"no DICOM files to send (skipped {len(skipped)})\n")
        return 1
    started = time.monotonic()
    try:
        outcomes = send(args.to, files, calling_ae=args.calling_ae, timeout=args.timeout)
    except (DicomPeerError, ValueError) as exc:
        sys.stderr.write(f"send failed: {exc}\n")
        return 1
    failed = [(f, o) for f, o in zip(files, outcomes, strict=True) if not o.ok]
    for path, outcome in failed:
        sys.stderr.write(f"failed {path}: {outcome.error}\n")
    seconds = time.monotonic() - started
    sys.stdout.write(
        f"sent {len(files) - len(failed)}, failed {len(failed)}, skipped {len(skipped)}"
        f" (to {args.to} in {seconds:.1f} s)\n"
    )
    return 0 if not failed else 1


def _add_dicom_client_options(parser: argparse.ArgumentParser, timeout: float) -> None:
    parser.add_argument("--calling-ae", default="PACS_TRIAGE", help="our AE title (default: PACS_TRIAGE)")
    parser.add_argument("--timeout", type=float, default=timeout, help=f"seconds (default: {timeout:g})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pacs-triage", description="AI triage beside a PACS")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="bind address (default: api.host setting)")
    serve.add_argument("--port", type=int, help="TCP port (default: api.port setting)")
    serve.add_argument("--config", help="YAML settings file (same as PACS_TRIAGE_CONFIG)")
    serve.set_defaults(func=_serve)
    ver = sub.add_parser("version", help="print the version")
    ver.set_defaults(func=_version)
    ech = sub.add_parser("echo", help="C-ECHO a DICOM peer: does it answer our AE title?")
    ech.add_argument("peer", type=_peer, metavar="AE@host:port", help="the peer, e.g. PACS@10.0.0.5:104")
    _add_dicom_client_options(ech, timeout=10)
    ech.set_defaults(func=_echo)
    snd = sub.add_parser("send", help="C-STORE DICOM files (and folders of them) to a peer")
    snd.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="DICOM files or folders")
    snd.add_argument("--to", type=_peer, required=True, metavar="AE@host:port", help="the peer to send to")
    snd.add_argument(
        "--recursive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="look into sub-folders (default: yes)",
    )
    _add_dicom_client_options(snd, timeout=30)
    snd.set_defaults(func=_send)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
