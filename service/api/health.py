"""Liveness and readiness (Kubernetes-style probes).

``/healthz/ready`` answers 503 with the reason whenever this replica cannot take new studies, and 200 again
as soon as it can, without a restart: every probe checks afresh, nothing is latched. Reasons, in order:

- starting (no store yet), models still warming up (a process that infers);
- a disk over ``retention.disk_high_watermark`` (the data disk, and the database's when SQLite lives on
  another one): every store would be refused with 507 / 0xA700, so a load balancer should send studies
  elsewhere. Issue 15 found ready at 200 while every store was refused on a full disk;
- a disk that refuses writes (a probe file written, fsynced and removed: ENOSPC, EROFS, EIO);
- the database cannot be queried;
- more jobs waiting than ``worker.ready_max_backlog`` (back-pressure).

The probe costs one small fsync per disk; orchestrators probe every few seconds.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.engine import make_url

from service.errors import NotReadyError
from service.store.files import disk_space

__all__ = ["disk_problems", "router"]

router = APIRouter(prefix="/healthz", tags=["health"])

_PROBE_NAME = ".incoming-ready-probe-{pid}.tmp"
"""Named like a partial write (:func:`service.store.files.remove_partial_writes`), so one a kill left
behind is swept at the next start; one per process, for replicas sharing the data directory."""


@router.get("/live")
async def live() -> dict[str, str]:
    """The process answers; says nothing about models."""
    return {"status": "live"}


def _disks(settings: Any) -> list[tuple[str, Path]]:
    """(what, directory) for the data disk and, for SQLite, the database's directory."""
    disks = [("data", settings.instances_dir)]
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        db_dir = Path(url.database).parent
        if db_dir.exists() and os.stat(db_dir).st_dev != os.stat(settings.instances_dir).st_dev:
            disks.append(("database", db_dir))
    return disks


def _write_probe(directory: Path) -> None:
    probe = directory / _PROBE_NAME.format(pid=os.getpid())
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"ready?\n")
        os.fsync(fd)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def disk_problems(settings: Any, watermark: float) -> list[dict[str, Any]]:
    """Why the data or database disk cannot take new instances now; empty when both can. Blocking.

    ``watermark`` is the store's own (``Store.disk_high_watermark``, from ``retention.disk_high_watermark``):
    ready says 503 exactly when the store would refuse."""
    problems: list[dict[str, Any]] = []
    for what, directory in _disks(settings):
        used = disk_space(directory).fraction_used
        if watermark < 1.0 and used > watermark:
            reason = f"the {what} disk is {used:.0%} full, above the high watermark of {watermark:.0%}"
            problems.append({"disk": what, "reason": reason, "used": round(used, 4)})
            continue
        try:
            _write_probe(directory)
        except OSError as exc:
            problems.append(
                {"disk": what, "reason": f"the {what} disk refuses writes ({exc.strerror or exc})"}
            )
    return problems


@router.get(
    "/ready",
    responses={503: {"description": "starting, warming up, a disk full or failing, or over its backlog"}},
)
async def ready(request: Request) -> JSONResponse:
    """200 once the store is open, (in a process that infers) every model session is warm and the disks
    take writes; else 503 with the reason. See the module docstring.

    Back-pressure: the body says how many jobs wait for a worker; with ``worker.ready_max_backlog`` set, a
    longer queue answers 503 so a load balancer sends new studies to another replica meanwhile.
    """
    state = getattr(request.app.state, "triage", None)
    if state is None:
        raise NotReadyError("the service is starting", part="store")
    if state.settings.runs_workers and not state.engine.ready:
        raise NotReadyError("models are still loading and warming up", part="engine")
    problems = await asyncio.to_thread(disk_problems, state.settings, state.instances.disk_high_watermark)
    if problems:
        raise NotReadyError(
            "; ".join(p["reason"] for p in problems) + ": new instances would be refused",
            part="disk",
            extra={"disks": problems},
        )
    try:
        backlog = await state.jobs.backlog()
    except Exception as exc:  # the database is gone or broken: not ready, and say why (no traceback)
        raise NotReadyError(
            f"the database cannot be queried ({type(exc).__name__})", part="database"
        ) from exc
    state.metrics.jobs_waiting.set(backlog)
    limit = state.settings.worker.ready_max_backlog
    if limit and backlog > limit:
        raise NotReadyError(
            f"{backlog} jobs are waiting for a worker (more than {limit})",
            part="backlog",
            extra={"backlog": backlog},
        )
    models = state.engine.model_names if state.settings.runs_workers else []
    return JSONResponse(
        {"status": "ready", "role": state.settings.role, "models": models, "backlog": backlog}
    )
