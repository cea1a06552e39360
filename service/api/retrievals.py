"""``POST /v1/retrievals``: pull a study from a PACS by accession number or study UID (C-FIND, C-MOVE),
or from a DICOMweb source (QIDO-RS, WADO-RS: :mod:`service.retrieve_web`).

The answer comes once the source's final C-MOVE response has arrived, i.e. once every instance it sent
was stored durably by our listener (each C-STORE is acknowledged only after its fsync); the study is then
analysed like any received over DICOM, and its result is at the ``results`` locations. 404 when the
source holds no such study, 502 when it cannot be reached or refuses the move (the problem says why).
With ``"method": "get"`` the study comes by C-GET on our own association instead (for a PACS that cannot
connect to us), each instance stored here exactly as the listener stores one before it is acknowledged.
A source given as an ``http(s)://`` base URL is a DICOMweb one: the study is found with QIDO-RS and
fetched with WADO-RS, each instance stored the same way before the answer; ``method`` does not apply.

The source must be one of ``dicom.retrieve_sources`` (``AE@host:port`` or a DICOMweb base URL): an API
call must not make the service open DICOM associations or HTTP connections to any host a client names
(the server-side request forgery of OWASP API7), and a source listed there is one whose AE table an
administrator has set up to know our AE title, or a DICOMweb server an administrator chose to trust.
Anything else is a 422 problem naming the setting. ``pacs-triage retrieve`` on the command line has no
such list: whoever runs it already has a shell on the machine.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.api.deps import AppState, StateDep
from service.assemble import ready_after
from service.deliver.association import Peer
from service.errors import BadRequestError, UnknownSourceError
from service.ingest.attempt import store_attempt
from service.retrieve import retrieve
from service.retrieve_get import StoreInstance
from service.retrieve_web import is_dicomweb_source, retrieve_dicomweb, source_url
from service.store.validate import parse_instance

__all__ = ["RetrievalRequest", "router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/retrievals", tags=["retrievals"])

_UID = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$"


class RetrievalRequest(BaseModel):
    """Which study, from where: exactly one of ``accession_number`` and ``study_uid``."""

    model_config = ConfigDict(extra="forbid")

    accession_number: Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[^*?\\]+$")] | None = None
    study_uid: Annotated[str, Field(max_length=64, pattern=_UID)] | None = None
    source: str = Field(
        description='the PACS as "AE@host:port", or a DICOMweb base URL (QIDO-RS, then WADO-RS)',
        examples=["PACS@10.0.0.5:104", "https://pacs.example/dicom-web"],
    )
    method: Literal["move", "get"] = Field(
        "move",
        description="C-MOVE to our listener (the PACS must know our AE title), or C-GET on our association;"
        " not for a DICOMweb source",
    )

    @model_validator(mode="after")
    def _one_key(self) -> RetrievalRequest:
        if (self.accession_number is None) == (self.study_uid is None):
            raise ValueError("give accession_number or study_uid, exactly one")
        return self


class RetrievalAnswer(BaseModel):
    studies: list[str]
    completed: int = Field(
        description="instances the source sent (C-MOVE completed sub-operations; DICOMweb: instances stored)"
    )
    failed: int
    warning: int
    results: list[str] = Field(description="where each study's result will be")


def _storer(state: AppState, loop: asyncio.AbstractEventLoop) -> StoreInstance:
    """Store one instance received by C-GET as the listener stores a C-STORE: durable, then its status."""

    def store_instance(data: bytes) -> int:
        with store_attempt("the C-GET source", "C-GET sub-operation") as attempt:
            parsed = parse_instance(data, "C-GET sub-operation", images_only=False)
            new, _due = state.instances.ingest_blocking(
                parsed, not_before=ready_after(state.settings, "dicom")
            )
            attempt.stored(new)
        if attempt.outcome == "stored":  # new and durable
            state.metrics.instances_received.labels(source="dicom").inc()
            loop.call_soon_threadsafe(state.notifier.work.set)
        return attempt.status

    return store_instance


def _web(configured: str) -> str | None:
    try:
        return source_url(configured)
    except ValueError:  # a malformed entry in the setting matches nothing
        return None


def _web_source(body: RetrievalRequest, allowed: list[str]) -> str:
    """The DICOMweb base URL of the request, if ``dicom.retrieve_sources`` lists it (else 422)."""
    if "method" in body.model_fields_set:
        raise BadRequestError("method (C-MOVE or C-GET) does not apply to a DICOMweb source", part="method")
    try:
        base = source_url(body.source)
    except ValueError as exc:
        raise BadRequestError(str(exc), part="source") from None
    if base not in {_web(p) for p in allowed if is_dicomweb_source(p)}:
        raise UnknownSourceError(
            f"{base} is not one of the sources this service may pull from (dicom.retrieve_sources)",
            part="source",
        )
    return base


@router.post(
    "", status_code=202, response_model=RetrievalAnswer, responses={400: {}, 404: {}, 422: {}, 502: {}}
)
async def create_retrieval(body: RetrievalRequest, state: StateDep) -> JSONResponse:
    """C-FIND the study at ``source``, then C-MOVE it to our AE title (or QIDO-RS, then WADO-RS, for a
    DICOMweb source); answers when it has arrived."""
    dicom = state.settings.dicom
    loop = asyncio.get_running_loop()
    if is_dicomweb_source(body.source):
        base = _web_source(body, dicom.retrieve_sources)
        result = await asyncio.to_thread(
            retrieve_dicomweb,
            base,
            accession_number=body.accession_number,
            study_uid=body.study_uid,
            store_instance=_storer(state, loop),
        )
    else:
        try:
            source = Peer.parse(body.source)
        except ValueError as exc:
            raise BadRequestError(str(exc), part="source") from None
        peers = {str(Peer.parse(p)) for p in dicom.retrieve_sources if not is_dicomweb_source(p)}
        if str(source) not in peers:
            raise UnknownSourceError(
                f"{source} is not one of the PACS this service may pull from (dicom.retrieve_sources)",
                part="source",
            )
        result = await asyncio.to_thread(
            retrieve,
            source,
            accession_number=body.accession_number,
            study_uid=body.study_uid,
            destination=dicom.ae_title,
            calling_ae=state.settings.delivery.calling_ae or dicom.ae_title,
            store_instance=_storer(state, loop) if body.method == "get" else None,
        )
    locations = [f"/v1/studies/{uid}/result" for uid in result.study_uids]
    answer = RetrievalAnswer(
        studies=list(result.study_uids),
        completed=result.completed,
        failed=result.failed,
        warning=result.warning,
        results=locations,
    )
    return JSONResponse(answer.model_dump(), status_code=202, headers={"Location": locations[0]})
