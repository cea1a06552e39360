"""``pacs-triage`` command line: ``serve`` runs the HTTP service under uvicorn, ``--version`` prints it.

``check`` is the preflight (:mod:`service.preflight`): one line per check, exit 1 on any failure. ``config
show`` prints the effective settings as YAML (the format of ``PACS_TRIAGE_CONFIG``) with secrets masked.

``echo`` and ``send`` are the DICOM client (:mod:`service.deliver.scu`) by hand: check that the PACS
answers our AE title, and C-STORE files to it. They import pynetdicom only when run (``version`` stays fast).
``hash-token`` writes a line of the API tokens file (:mod:`service.api.auth`). ``models list | check |
init`` (:mod:`service.models_cli`) list the models, check a model folder, draft a card for an ONNX file.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.deliver.association import Peer
    from service.dicom.tls import TlsClient

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    _use_config(args)
    from service.app import create_app
    from service.config import Settings
    from service.logs import configure_logging

    settings = Settings(**({"role": args.role} if args.role else {}))
    configure_logging(settings.log_level, settings.log_format)
    host = args.host or settings.api.host
    port = args.port if args.port is not None else settings.api.port
    if settings.auth.open and not _is_loopback(host):
        sys.stderr.write(
            f"pacs-triage: refusing to serve an open API (auth.open) on {host}; bind 127.0.0.1 or configure "
            "tokens (PACS_TRIAGE_AUTH__ADMIN_TOKENS / PACS_TRIAGE_AUTH__TOKENS_FILE)\n"
        )
        return 2
    from service.api.http_server import uvicorn_options  # header and keep-alive timeouts (api.*)

    app = create_app(settings)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, **uvicorn_options(settings.api))
    return 0


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:  # not service.app.__version__: importing the app (ORT, pynetdicom) takes a second
        return version("pacs-triage")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def _version(_args: argparse.Namespace) -> int:
    sys.stdout.write(f"pacs-triage {_package_version()}\n")
    return 0


def _use_config(args: argparse.Namespace) -> None:
    if getattr(args, "config", None):
        os.environ["PACS_TRIAGE_CONFIG"] = args.config


def _check(args: argparse.Namespace) -> int:
    import logging

    from service.preflight import run_checks, settings_or_findings

    _use_config(args)
    logging.disable(logging.ERROR)  # every problem is one of the lines below; library logs would repeat it
    try:
        settings, findings = settings_or_findings()
        for finding in findings:
            sys.stdout.write(finding.line() + "\n")
        if settings is not None:
            for finding in run_checks(settings, echo_timeout=args.timeout):
                sys.stdout.write(finding.line() + "\n")
                sys.stdout.flush()  # a C-ECHO may take seconds: show what is known so far
                findings.append(finding)
    finally:
        logging.disable(logging.NOTSET)
    failed = [f for f in findings if not f.ok]
    sys.stdout.write(f"{len(findings) - len(failed)} ok, {len(failed)} failed\n")
    return 1 if failed else 0


_SECRET_NAME = re.compile(r"token|secret|password|passwd|credential|api_key", re.IGNORECASE)
_URL_SECRET_FIELDS = ("webhooks", "escalation_webhooks")
"""Webhook URLs carry their secret in the path or query (Slack, Teams): only scheme and host are shown."""
MASK = "**********"


def _masked(value: Any, key: str = "") -> Any:
    """The settings dump with secrets masked: secret-named fields, passwords in URLs, webhook paths."""
    from urllib.parse import urlsplit

    if isinstance(value, dict):
        return {k: _masked(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, key) for v in value]
    if not isinstance(value, str) or value == MASK:
        return value
    if _SECRET_NAME.search(key) and not key.endswith("_file"):
        return MASK
    if "://" not in value:
        return value
    url = urlsplit(value)
    if key in _URL_SECRET_FIELDS:
        return f"{url.scheme}://{url.hostname}{f':{url.port}' if url.port else ''}/{MASK}"
    if url.password is not None:
        return value.replace(f":{url.password}@", f":{MASK}@", 1)
    return value


def _config_show(args: argparse.Namespace) -> int:
    import yaml
    from pydantic import ValidationError

    from service.config import Settings

    _use_config(args)
    try:
        settings = Settings()
    except (ValidationError, ValueError, OSError) as exc:
        sys.stderr.write(f"pacs-triage: invalid settings: {exc}\n")
        return 1
    data = _masked(settings.model_dump(mode="json"))
    sys.stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return 0


def _peer(text: str) -> Peer:
    """argparse type for ``AE@host:port``: a bad value is a usage error that says what is expected."""
    from service.deliver.association import Peer

    try:
        return Peer.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tls(args: argparse.Namespace) -> TlsClient | None:
    """``--tls`` or any ``--tls-*`` option: DICOM TLS (a CA file alone makes no sense over plain TCP)."""
    from service.dicom.tls import TlsClient

    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return TlsClient(args.tls_ca, args.tls_cert, args.tls_key)


def _echo(args: argparse.Namespace) -> int:
    from service.deliver.scu import echo
    from service.errors import DicomPeerError

    try:
        result = echo(args.peer, calling_ae=args.calling_ae, timeout=args.timeout, tls=_tls(args))
    except (DicomPeerError, ValueError) as exc:  # ValueError: a bad --calling-ae or TLS file
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

    from service.deliver.scu import send
    from service.errors import DicomPeerError

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
        outcomes = send(args.to, files, calling_ae=args.calling_ae, timeout=args.timeout, tls=_tls(args))
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


def _retrieve(args: argparse.Namespace) -> int:
    """C-FIND then C-MOVE a study from a PACS to the running service's AE (:mod:`service.retrieve`), or,
    from a DICOMweb base URL, QIDO-RS and WADO-RS, then C-STORE to the listener (:mod:`service.retrieve_web`).
    """
    from service.errors import PacsTriageError
    from service.retrieve import retrieve
    from service.retrieve_web import is_dicomweb_source, retrieve_dicomweb_to

    key = {"accession_number": args.accession, "study_uid": args.study}
    common = {"calling_ae": args.calling_ae, "timeout": args.timeout, "tls": _tls(args)}
    try:
        if is_dicomweb_source(args.source):
            target = str(args.store_to)
            result = retrieve_dicomweb_to(args.source, args.store_to, **key, **common)
        else:
            target = args.move_to
            result = retrieve(_peer(args.source), destination=args.move_to, **key, **common)
    except (PacsTriageError, ValueError, argparse.ArgumentTypeError) as exc:  # not found, unreachable
        sys.stderr.write(f"retrieve failed: {exc}\n")
        return 1
    sys.stdout.write(
        f"retrieved {len(result.study_uids)} study(ies) to {target}: {result.completed} instance(s)"
        f" sent, {result.failed} failed ({result.seconds:.1f} s)\n"
    )
    return 0 if not result.failed else 1


def _hash_token(args: argparse.Namespace) -> int:
    """Print ``role name sha256`` for a token read from stdin, or for a new one (shown on stderr only)."""
    import getpass
    import secrets

    from service.api.auth import token_line

    if args.generate:
        token = secrets.token_urlsafe(32)
    elif sys.stdin.isatty():
        token = getpass.getpass("token (not echoed): ").strip()
    else:
        token = sys.stdin.read().strip()
    if not token or any(c.isspace() for c in token):
        sys.stderr.write("hash-token: the token must be one non-empty word on stdin (or use --generate)\n")
        return 1
    try:
        line = token_line(args.role, args.name, token)
    except ValueError as exc:
        sys.stderr.write(f"hash-token: {exc}\n")
        return 1
    if args.generate:
        sys.stderr.write(f"token for {args.name} (give it to the client; only its hash is kept): {token}\n")
    sys.stdout.write(line + "\n")
    return 0


def _add_dicom_client_options(parser: argparse.ArgumentParser, timeout: float) -> None:
    parser.add_argument("--calling-ae", default="PACS_TRIAGE", help="our AE title (default: PACS_TRIAGE)")
    parser.add_argument("--timeout", type=float, default=timeout, help=f"seconds (default: {timeout:g})")
    tls = parser.add_argument_group("DICOM TLS (any --tls-* option implies --tls)")
    tls.add_argument(
        "--tls",
        action="store_true",
        help="use DICOM TLS; the peer is verified against --tls-ca, else the system CAs",
    )
    tls.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA bundle the peer's certificate chains to")
    tls.add_argument("--tls-cert", type=Path, metavar="PEM", help="our client certificate, for peers asking")
    tls.add_argument("--tls-key", type=Path, metavar="PEM", help="the unencrypted key of --tls-cert")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pacs-triage", description="AI triage beside a PACS")
    parser.add_argument("--version", action="version", version=f"pacs-triage {_package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="bind address (default: api.host setting)")
    serve.add_argument("--port", type=int, help="TCP port (default: api.port setting)")
    serve.add_argument("--config", help="YAML settings file (same as PACS_TRIAGE_CONFIG)")
    serve.add_argument(
        "--role",
        choices=("all", "api", "listener", "worker"),
        help="run one part against a shared PostgreSQL (default: the role setting, 'all')",
    )
    serve.set_defaults(func=_serve)
    ver = sub.add_parser("version", help="print the version (same as --version)")
    ver.set_defaults(func=_version)
    chk = sub.add_parser(
        "check",
        help="preflight: settings, data directory, disk, database, models, TLS files, C-ECHO destinations",
        description="Checks the installation as configured, one line each; exits 1 if any check fails.",
    )
    chk.add_argument("--config", help="YAML settings file (same as PACS_TRIAGE_CONFIG)")
    chk.add_argument("--timeout", type=float, default=10.0, help="seconds per C-ECHO (default: 10)")
    chk.set_defaults(func=_check)
    cfg = sub.add_parser("config", help="settings: 'config show' prints the effective ones")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    show = cfg_sub.add_parser("show", help="print the effective settings as YAML, secrets masked")
    show.add_argument("--config", help="YAML settings file (same as PACS_TRIAGE_CONFIG)")
    show.set_defaults(func=_config_show)
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
    ret = sub.add_parser(
        "retrieve", help="pull a study from a PACS to the service (C-FIND, C-MOVE; or QIDO-RS, WADO-RS)"
    )
    key = ret.add_mutually_exclusive_group(required=True)
    key.add_argument("--accession", help="the study's accession number")
    key.add_argument("--study", metavar="UID", help="the Study Instance UID")
    ret.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="AE@host:port|URL",
        help="the PACS, or a DICOMweb base URL (https://host/dicom-web)",
    )
    ret.add_argument(
        "--move-to", default="PACS_TRIAGE", help="our listener's AE title (default: PACS_TRIAGE)"
    )
    ret.add_argument(
        "--store-to",
        type=_peer,
        default="PACS_TRIAGE@127.0.0.1:11112",
        metavar="AE@host:port",
        help="DICOMweb source only: the listener to C-STORE the study to"
        " (default: PACS_TRIAGE@127.0.0.1:11112)",
    )
    _add_dicom_client_options(ret, timeout=30)
    ret.set_defaults(func=_retrieve)
    tok = sub.add_parser(
        "hash-token",
        help="print a tokens-file line 'role name sha256' for a token on stdin (or a new one)",
        description="Reads a bearer token from stdin (or makes one with --generate, shown on stderr) and "
        "prints the 'role name sha256' line for auth.tokens_file on stdout: append it to the file.",
    )
    tok.add_argument("role", choices=["reader", "admin"], help="reader: GET only; admin: everything")
    tok.add_argument("name", help="who holds the token, for the logs (letters, digits, . _ @ : + -)")
    tok.add_argument("--generate", action="store_true", help="make a random token (secrets.token_urlsafe)")
    tok.set_defaults(func=_hash_token)
    from service.models_cli import add_models_parser  # stdlib only at import: --version stays fast

    add_models_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
