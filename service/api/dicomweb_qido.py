"""QIDO-RS: search for studies, a study's series and its instances (PS3.18 10.6), in dicom+json.

Matching follows PS3.4 C.2.2.2 as PS3.18 8.3.4 asks: single value (exact, case-sensitive; person names
case-insensitively), wildcards ``*`` and ``?`` on strings, list of UIDs (``,`` or ``\\`` between them),
ranges ``a-b`` / ``-b`` / ``a-`` on dates and times, and universal matching for an empty value (the
attribute is returned, whatever its value). Keys are keywords (``PatientID``) or tags (``00100020``).

Where the keys are held by the database (StudyInstanceUID, an exact AccessionNumber, ModalitiesInStudy;
``Modality`` at study level means the same), the database narrows the studies first and paging happens
before any file is opened; any other key (PatientID, StudyDate, ...) is matched on the stored headers
(:mod:`service.store.dicomweb_query`). ``includefield`` adds attributes (or ``all``); ``limit`` and
``offset`` page the matches in a stable order (oldest first). At most :data:`MAX_RESULTS` matches are
returned at once; when more matched and no ``limit`` was asked, the ``Warning: 299`` header says so
(PS3.18 8.3.4.4). An unknown key is a 400 problem; an unknown study a 404 problem.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from service.api.deps import StateDep, StudyUID
from service.api.dicomweb_common import (
    DICOM_JSON,
    JSON_ARRAY,
    DicomJSONResponse,
    dicom_json,
    query_for,
    study_url,
)
from service.errors import BadRequestError, ObjectNotFoundError, StudyNotFoundError
from service.store.dicomweb_query import DicomwebQuery, StoredObject, StudySummary, read_header

__all__ = ["MAX_RESULTS", "matches", "router"]

router = APIRouter(tags=["dicomweb"])

MAX_RESULTS = 1000

_T = Tag  # shorthand for the attribute lists below
STUDY_FIELDS = [_T(k) for k in (
    "SpecificCharacterSet", "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
    "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyID", "StudyDescription", "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)]  # fmt: skip
"""PS3.18 Table 10.6.3-3: attributes every study match carries."""
SERIES_FIELDS = [_T(k) for k in (
    "SpecificCharacterSet", "Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
    "NumberOfSeriesRelatedInstances", "StudyInstanceUID",
)]  # fmt: skip
"""PS3.18 Table 10.6.3-4."""
INSTANCE_FIELDS = [_T(k) for k in (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns",
    "BitsAllocated", "NumberOfFrames", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
)]  # fmt: skip
"""PS3.18 Table 10.6.3-5, plus the study and series UIDs a client needs to retrieve the instance."""

_DB_STUDY_KEYS = {_T("StudyInstanceUID"), _T("ModalitiesInStudy"), _T("Modality")}
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_LIST_VRS = {"UI", "CS"}
_RANGE_VRS = {"DA", "TM", "DT"}


@dataclass
class QidoQuery:
    """What a QIDO-RS request asks: matching keys by tag, extra fields, paging."""

    filters: dict[int, str] = field(default_factory=dict)
    include: set[int] = field(default_factory=set)
    include_all: bool = False
    limit: int | None = None
    offset: int = 0


def _tag(key: str) -> int:
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        tag = int(key, 16)
        if keyword_for_tag(tag):
            return tag
    elif (tag_number := tag_for_keyword(key)) is not None:
        return int(tag_number)
    raise BadRequestError(f"{key!r} is not a DICOM attribute keyword or tag this service knows", part=key)


def _count(key: str, value: str) -> int:
    if not value.isdigit():
        raise BadRequestError(f"{key} must be a non-negative integer", part=key)
    return int(value)


def parse_query(request: Request) -> QidoQuery:
    """The request's query parameters as a :class:`QidoQuery` (PS3.18 8.3.4); 400 for what we cannot use."""
    query = QidoQuery()
    for key, value in request.query_params.multi_items():
        if key == "limit":
            query.limit = _count(key, value)
        elif key == "offset":
            query.offset = _count(key, value)
        elif key == "fuzzymatching":
            continue  # allowed to be ignored (PS3.18 8.3.4.1): person names already match case-insensitively
        elif key == "includefield":
            for name in filter(None, (v.strip() for v in value.split(","))):
                if name == "all":
                    query.include_all = True
                else:
                    query.include.add(_tag(name))
        elif "." in key:
            raise BadRequestError(f"matching on sequence items ({key}) is not supported", part=key)
        else:
            query.filters[_tag(key)] = value
    return query


def _values(ds: Dataset, tag: int) -> list[str]:
    elem = ds.get(tag)
    if elem is None or elem.value is None or elem.value == "":
        return []
    raw = elem.value if elem.VM > 1 else [elem.value]
    return [str(v) for v in raw]


def _wildcard(pattern: str, flags: int) -> re.Pattern[str]:
    return re.compile(
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), flags
    )


def matches(ds: Dataset, tag: int, query: str) -> bool:
    """Does ``ds`` match ``query`` on attribute ``tag`` (PS3.4 C.2.2.2)?"""
    if query == "":
        return True  # universal matching
    vr = dictionary_VR(tag)
    values = _values(ds, tag)
    if vr in _LIST_VRS:
        wanted = {v.strip() for v in re.split(r"[\\,]", query)}
        if not any("*" in w or "?" in w for w in wanted):
            return any(v in wanted for v in values)
    if vr in _RANGE_VRS and "-" in query:
        low, high = query.split("-", 1)
        return any((not low or v >= low) and (not high or v[: len(high)] <= high) for v in values)
    flags = re.IGNORECASE if vr == "PN" else 0
    if "*" in query or "?" in query:
        pattern = _wildcard(query, flags)
        return any(pattern.fullmatch(v) for v in values)
    if flags:
        return any(v.lower() == query.lower() for v in values)
    return query in values


def _answer(attrs: Dataset, fields: Sequence[int], query: QidoQuery, url: str) -> dict[str, Any]:
    """One match: the level's fields, the keys asked for and ``includefield``, then its RetrieveURL."""
    out = Dataset()
    wanted = [*fields, *query.filters, *query.include]
    if query.include_all:
        wanted += [e.tag for e in attrs if e.VR not in _BINARY_VRS and not e.tag.is_private]
    for tag in dict.fromkeys(wanted):
        if tag in attrs:
            out.add(attrs[tag])
        elif (vr := dictionary_VR(tag)) not in _BINARY_VRS:
            out.add_new(tag, vr, None)  # a required attribute without a value is returned empty
    out.RetrieveURL = url
    try:
        return dicom_json(out)
    except Exception:  # a garbled stored value: answer the match without the bad elements
        clean = Dataset()
        for elem in out:
            try:
                Dataset({elem.tag: elem}).to_json_dict()
            except Exception:
                continue
            clean.add(elem)
        return dicom_json(clean)


def _page(items: list[Any], query: QidoQuery) -> tuple[list[Any], bool]:
    """Apply offset and limit; True when results were cut by :data:`MAX_RESULTS`, not by ``limit``."""
    rest = items[query.offset :]
    limit = min(query.limit, MAX_RESULTS) if query.limit is not None else MAX_RESULTS
    return rest[:limit], query.limit is None and len(rest) > MAX_RESULTS


def _reply(
    matched: list[Dataset],
    query: QidoQuery,
    url: Callable[[Dataset], str],
    fields: Sequence[int],
) -> DicomJSONResponse:
    page, cut = _page(matched, query)
    headers = (
        {"Warning": '299 pacs-triage "There are additional results that can be requested"'} if cut else {}
    )
    return DicomJSONResponse([_answer(a, fields, query, url(a)) for a in page], headers=headers)


# ---- studies ------------------------------------------------------------------------------------------


def _study_attrs(summary: StudySummary) -> Dataset:
    ds = (read_header(summary.header) if summary.header else None) or Dataset()
    attrs = Dataset()
    for elem in ds:
        if elem.tag.group > 0x0002:  # not the file meta
            attrs.add(elem)
    attrs.StudyInstanceUID = summary.study_uid
    if "AccessionNumber" not in attrs and summary.accession_number:
        attrs.AccessionNumber = summary.accession_number
    attrs.ModalitiesInStudy = list(summary.modalities)
    attrs.NumberOfStudyRelatedSeries = summary.series_count
    attrs.NumberOfStudyRelatedInstances = summary.instance_count
    return attrs


def _find_studies(db: DicomwebQuery, query: QidoQuery) -> list[Dataset]:
    filters = dict(query.filters)
    uids = filters.get(_T("StudyInstanceUID"))
    accession = filters.get(_T("AccessionNumber"))
    modality = filters.get(_T("ModalitiesInStudy")) or filters.get(_T("Modality"))
    exact_accession = accession if accession and not any(c in accession for c in "*?") else None
    found = db.find_studies(
        study_uids=[u.strip() for u in re.split(r"[\\,]", uids)] if uids else None,
        accession_number=exact_accession,
        modalities=[m.strip() for m in re.split(r"[\\,]", modality)] if modality else None,
    )
    if modality and _T("Modality") in filters:
        filters[_T("ModalitiesInStudy")] = filters.pop(_T("Modality"))
    on_headers = {t: v for t, v in filters.items() if t not in _DB_STUDY_KEYS and v != ""}
    if not on_headers:  # page before opening any file
        end = query.offset + (min(query.limit, MAX_RESULTS) if query.limit is not None else MAX_RESULTS + 1)
        found = found[:end]
    attrs = [_study_attrs(s) for s in db.summaries(found)]
    return [a for a in attrs if all(matches(a, t, v) for t, v in on_headers.items())]


@router.get(
    "/studies",
    response_class=DicomJSONResponse,
    responses={200: {"content": {DICOM_JSON: {"schema": JSON_ARRAY}}}, 400: {}},
)
async def search_studies(request: Request, state: StateDep) -> DicomJSONResponse:
    """Search for Studies (PS3.18 10.6.1): StudyInstanceUID, AccessionNumber, PatientID, StudyDate,
    ModalitiesInStudy (or Modality) and any other study attribute of the stored headers."""
    query = parse_query(request)
    matched = await asyncio.to_thread(_find_studies, query_for(state), query)
    return _reply(matched, query, lambda a: study_url(request, a.StudyInstanceUID), STUDY_FIELDS)


# ---- series and instances -----------------------------------------------------------------------------


def _object_attrs(obj: StoredObject, count: int | None = None) -> Dataset:
    header = read_header(obj.path) or Dataset()
    attrs = Dataset()
    for elem in header:
        if elem.tag.group > 0x0002:
            attrs.add(elem)
    attrs.StudyInstanceUID, attrs.SeriesInstanceUID = obj.study_uid, obj.series_uid
    attrs.SOPInstanceUID, attrs.SOPClassUID = obj.sop_instance_uid, obj.sop_class_uid
    if obj.modality and "Modality" not in attrs:
        attrs.Modality = obj.modality
    if count is not None:
        attrs.NumberOfSeriesRelatedInstances = count
    return attrs


def _objects(db: DicomwebQuery, study_uid: str, series_uid: str | None) -> list[StoredObject]:
    if not db.study_exists(study_uid):
        raise StudyNotFoundError("no instance of this study has been received", part="study_uid")
    objects = db.objects(study_uid, series_uid)
    if series_uid is not None and not objects:
        raise ObjectNotFoundError("the study has no series with this UID", part="series_uid")
    return objects


def _find_series(db: DicomwebQuery, study_uid: str, query: QidoQuery) -> list[Dataset]:
    by_series: dict[str, list[StoredObject]] = {}
    for obj in _objects(db, study_uid, None):
        by_series.setdefault(obj.series_uid, []).append(obj)
    attrs = [_object_attrs(objs[0], len(objs)) for objs in by_series.values()]
    for a in attrs:  # instance-level attributes of the first instance do not describe the series
        for keyword in ("SOPInstanceUID", "SOPClassUID", "InstanceNumber"):
            if keyword in a:
                del a[keyword]
    return [a for a in attrs if all(matches(a, t, v) for t, v in query.filters.items())]


def _find_instances(
    db: DicomwebQuery, study_uid: str, series_uid: str | None, query: QidoQuery
) -> list[Dataset]:
    objects = _objects(db, study_uid, series_uid)
    if not query.filters:
        objects = objects[: query.offset + MAX_RESULTS + 1]
    attrs = [_object_attrs(o) for o in objects]
    return [a for a in attrs if all(matches(a, t, v) for t, v in query.filters.items())]


@router.get(
    "/studies/{study_uid}/series",
    response_class=DicomJSONResponse,
    responses={200: {"content": {DICOM_JSON: {"schema": JSON_ARRAY}}}, 400: {}, 404: {}},
)
async def search_series(study_uid: StudyUID, request: Request, state: StateDep) -> DicomJSONResponse:
    """Search for Series of a study (PS3.18 10.6.1), our SR and preview series included."""
    query = parse_query(request)
    matched = await asyncio.to_thread(_find_series, query_for(state), study_uid, query)
    return _reply(
        matched,
        query,
        lambda a: study_url(request, study_uid, "series", a.SeriesInstanceUID),
        SERIES_FIELDS,
    )


def _instance_url(request: Request, a: Dataset) -> str:
    return study_url(
        request, a.StudyInstanceUID, "series", a.SeriesInstanceUID, "instances", a.SOPInstanceUID
    )


@router.get(
    "/studies/{study_uid}/instances",
    response_class=DicomJSONResponse,
    responses={200: {"content": {DICOM_JSON: {"schema": JSON_ARRAY}}}, 400: {}, 404: {}},
)
async def search_instances(study_uid: StudyUID, request: Request, state: StateDep) -> DicomJSONResponse:
    """Search for Instances of a study (PS3.18 10.6.1)."""
    query = parse_query(request)
    matched = await asyncio.to_thread(_find_instances, query_for(state), study_uid, None, query)
    return _reply(matched, query, lambda a: _instance_url(request, a), INSTANCE_FIELDS)


@router.get(
    "/studies/{study_uid}/series/{series_uid}/instances",
    response_class=DicomJSONResponse,
    responses={200: {"content": {DICOM_JSON: {"schema": JSON_ARRAY}}}, 400: {}, 404: {}},
)
async def search_series_instances(
    study_uid: StudyUID, series_uid: StudyUID, request: Request, state: StateDep
) -> DicomJSONResponse:
    """Search for Instances of one series (PS3.18 10.6.1)."""
    query = parse_query(request)
    matched = await asyncio.to_thread(_find_instances, query_for(state), study_uid, series_uid, query)
    return _reply(matched, query, lambda a: _instance_url(request, a), INSTANCE_FIELDS)
