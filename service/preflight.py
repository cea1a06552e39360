"""``pacs-triage check``: the preflight an admin runs before starting the service, or after changing it.

Each check answers one question about the installation as configured (environment, ``PACS_TRIAGE_CONFIG``)
and gives one line: ``ok   <check>: <what was found>`` or ``FAIL <check>: <why>``. The command exits 1 when
any line is a FAIL. The checks do what the service will do at start-up, without starting it: read the
settings and the files they name, write to the data directory, open the database and compare its schema
with the code's migrations, start every model in ONNX Runtime (a warm-up run with the card's input shape
checks the graph against its card), and C-ECHO every DICOM destination (PS3.4 Annex A) over TLS when
delivery uses it. Nothing is changed: no migration runs, no file is left behind.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from service.store.files import disk_space

if TYPE_CHECKING:
    from service.config import Settings

__all__ = ["Finding", "run_checks", "settings_or_findings"]


@dataclass(frozen=True)
class Finding:
    """One check's outcome: ``check`` names it, ``detail`` says what was found or why it failed."""

    check: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.check}: {self.detail}"


def settings_or_findings() -> tuple[Settings | None, list[Finding]]:
    """The settings from the environment and the YAML file, or one FAIL per invalid setting."""
    from service.config import Settings

    try:
        return Settings(), [Finding("settings", True, "valid")]
    except ValidationError as exc:
        return None, [
            Finding("settings", False, f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}")
            for e in exc.errors()
        ]
    except (OSError, ValueError) as exc:  # the YAML file: unreadable, not YAML, not a mapping
        return None, [Finding("settings", False, str(exc))]


def run_checks(settings: Settings, *, echo_timeout: float = 10.0) -> list[Finding]:
    """Every check after the settings, in the order the service needs them at start-up; ``echo_timeout``
    bounds each network wait (C-ECHO, a KServe server)."""
    checks = (_rules_and_tokens, _data_dir, _disk_space, _database)
    found = [finding for check in checks for finding in check(settings)]
    found.extend(_models(settings, echo_timeout))
    found.extend(_tls_files(settings))
    found.extend(_destinations(settings, echo_timeout))
    return found


def _rules_and_tokens(settings: Settings) -> Iterator[Finding]:
    from service.api.auth import read_tokens_file
    from service.errors import AuthConfigError
    from service.routing import load_rules

    path = settings.routing_rules_path
    try:
        rules = load_rules(path)
        yield Finding("routing rules", True, f"{len(rules.rules)} rule(s) in {path}")
    except (OSError, ValueError) as exc:  # pydantic's ValidationError and YAML errors are ValueErrors
        yield Finding("routing rules", False, f"{path}: {str(exc).splitlines()[0]}")
    if settings.auth.tokens_file is not None:
        try:
            entries = read_tokens_file(settings.auth.tokens_file)
            yield Finding("tokens file", True, f"{len(entries)} token(s) in {settings.auth.tokens_file}")
        except AuthConfigError as exc:
            yield Finding("tokens file", False, str(exc))


def _data_dir(settings: Settings) -> Iterator[Finding]:
    """Writable the way the service writes: create, fsync, remove (a read-only mount fails here)."""
    directory = settings.data_dir
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".preflight-", dir=directory)
        try:
            os.write(fd, b"pacs-triage check\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        yield Finding("data directory", False, f"{directory} is not writable: {exc.strerror or exc}")
        return
    yield Finding("data directory", True, f"{directory.resolve()} writable")


def _disk_space(settings: Settings) -> Iterator[Finding]:
    """Above ``retention.disk_high_watermark`` the service refuses new instances (507 / 0xA700)."""
    directory = next((p for p in (settings.data_dir, *settings.data_dir.parents) if p.exists()), Path("."))
    space = disk_space(directory)
    used, limit = space.fraction_used, settings.retention.disk_high_watermark
    detail = f"{used:.0%} used, {space.available / 2**30:.1f} GiB free (instances refused above {limit:.0%})"
    yield Finding("disk space", used < limit, detail)


def _database(settings: Settings) -> Iterator[Finding]:
    """Reachable, and at the schema revision of this code's migrations (``serve`` migrates at start)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from service.store.database import SQLITE_MINIMUM, sqlite_too_old
    from service.store.migrate import alembic_config

    url = make_url(settings.database_url)
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and sqlite3.sqlite_version_info < SQLITE_MINIMUM:
        yield Finding("database", False, sqlite_too_old())
        return
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        yield Finding("database", True, f"{shown} not created yet: the first start creates it")
        return
    connect_args = {"connect_timeout": 5} if url.get_backend_name() == "postgresql" else {}
    engine = create_engine(url, connect_args=connect_args)
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
            has_tables = inspect(conn).has_table("studies")
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        yield Finding("database", False, f"{shown} unreachable: {reason}")
        return
    finally:
        engine.dispose()
    if current == head:
        yield Finding("database", True, f"{shown} reachable, schema at {head}")
    elif current is None and not has_tables:
        yield Finding("database", True, f"{shown} reachable and empty: the first start creates the schema")
    elif current is None:
        yield Finding("database", False, f"{shown} was created without migrations: move it aside")
    else:
        yield Finding(
            "database",
            False,
            f"{shown} schema at {current}, this version needs {head}: back it up, then start the service"
            " once to migrate it (or run the version that wrote it)",
        )


def _models(settings: Settings, timeout: float) -> Iterator[Finding]:
    """Every card loads and matches its file; every model starts as the service starts it: in ONNX Runtime
    with a warm-up run of the card's input shape, or on its KServe v2 server (ready, metadata matching the
    card), waiting at most ``timeout`` seconds for a server."""
    from service.inference.registry import ModelRegistry
    from service.inference.router import EngineRouter

    registry = ModelRegistry.from_directory(settings.models_dir)
    engine = EngineRouter.from_settings(
        registry, settings.inference, remote_options={"start_timeout": timeout}
    )

    async def start() -> dict[str, list[str]]:
        await engine.start()
        try:
            return {name: engine.providers_for(name) for name in engine.model_names}
        finally:
            await engine.stop()

    started = asyncio.run(start()) if registry.models else {}
    for name, providers in sorted(started.items()):
        model = registry.models[name]
        where = (
            f"remote ({settings.inference.remote_models[name]})"
            if name in settings.inference.remote_models
            else ", ".join(providers)
        )
        yield Finding(f"model {name}", True, f"{model.card.version} runs on {where}")
    for name, why in sorted(registry.errors.items()):
        yield Finding("models" if name == "*" else f"model {name}", False, why)
    if not started and not registry.errors:
        yield Finding("models", False, f"no models in {settings.models_dir}")


def _tls_files(settings: Settings) -> Iterator[Finding]:
    """Readable PEM files that make a TLS context: certificate with its key, CA bundle."""
    groups = (
        ("dicom", settings.dicom.tls_cert_file, settings.dicom.tls_key_file, settings.dicom.tls_ca_file),
        (
            "delivery",
            settings.delivery.tls_cert_file,
            settings.delivery.tls_key_file,
            settings.delivery.tls_ca_file,
        ),
    )
    for group, cert, key, ca in groups:
        if cert is None and key is None and ca is None:
            continue
        check = f"{group} TLS files"
        unreadable = [f"{p}: {_unreadable(p)}" for p in (cert, key, ca) if p is not None and _unreadable(p)]
        if unreadable:
            yield Finding(check, False, "; ".join(unreadable))
            continue
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if group == "delivery" else ssl.PROTOCOL_TLS_SERVER)
        try:
            if cert is not None or key is not None:
                if cert is None or key is None:
                    raise ssl.SSLError(f"{group}.tls_cert_file and {group}.tls_key_file go together")
                ctx.load_cert_chain(cert, key)
            if ca is not None:
                ctx.load_verify_locations(ca)
        except ssl.SSLError as exc:
            yield Finding(check, False, f"not usable: {exc.reason or exc}")
            continue
        yield Finding(check, True, ", ".join(str(p) for p in (cert, key, ca) if p is not None))


def _unreadable(path: Path) -> str | None:
    try:
        with path.open("rb") as fh:
            fh.read(1)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _destinations(settings: Settings, timeout: float) -> Iterator[Finding]:
    from service.deliver.association import Peer
    from service.deliver.scu import echo
    from service.dicom.tls import TlsClient
    from service.errors import DicomPeerError

    s = settings.delivery
    calling_ae = s.calling_ae or settings.dicom.ae_title
    for text in s.destinations:
        check = f"destination {text}"
        try:
            peer = Peer.parse(text)
            tls = TlsClient(s.tls_ca_file, s.tls_cert_file, s.tls_key_file) if s.tls else None
            result = echo(peer, calling_ae=calling_ae, timeout=timeout, tls=tls)
        except (DicomPeerError, ValueError, OSError) as exc:
            yield Finding(check, False, f"C-ECHO failed: {exc}")
            continue
        if result.ok:
            yield Finding(check, True, f"C-ECHO answered in {result.seconds * 1000:.0f} ms")
        else:
            yield Finding(check, False, f"C-ECHO answered status 0x{result.status:04X}")
