"""Generated documentation: the OpenAPI document, a DICOM conformance summary and the model card's JSON
Schema, all from the code.

``scripts/gen-docs`` (``python -m service.docs [DIR]``) writes ``docs/openapi.json``,
``docs/conformance.md`` and ``docs/card.schema.json``; ``tests/test_docs.py`` regenerates them and
compares, so the committed files cannot drift from the code. The output is deterministic: sorted JSON,
no timestamps, settings shown with their defaults (never the environment's values).

The conformance summary follows the headings of a PS3.2 conformance statement (network services, transfer
syntaxes, association policies, security) without claiming to be one.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    ImplicitVRLittleEndian,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

__all__ = ["card_schema_json", "conformance_markdown", "main", "openapi_json", "write_docs"]

OPENAPI_FILE = "openapi.json"
CONFORMANCE_FILE = "conformance.md"
CARD_SCHEMA_FILE = "card.schema.json"


def openapi_json() -> str:
    """The API's OpenAPI document as served with tokens required, pretty-printed with sorted keys."""
    from service.app import create_app
    from service.config import Settings

    doc = create_app(Settings(auth={"open": False})).openapi()
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def card_schema_json() -> str:
    """The JSON Schema (draft 2020-12, pydantic's) of ``models/<name>/card.json``: an editor or a CI job
    can validate a card without installing the service; ``pacs-triage models check`` does more."""
    from service.inference.card import ModelCard

    schema = ModelCard.model_json_schema()
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, Path):
        return f"`{value}`"
    return f"`{json.dumps(value)}`"


def _settings_table(group: str, model: type[BaseModel], names: Iterable[str] | None = None) -> list[str]:
    """A Markdown table of one settings group: setting, environment variable, default, meaning."""
    rows = [
        "| Setting | Environment variable | Default | Meaning |",
        "|---|---|---|---|",
    ]
    defaults = model()
    for name, field in model.model_fields.items():
        if names is not None and name not in names:
            continue
        env = f"PACS_TRIAGE_{group.upper()}__{name.upper()}"
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{group}.{name}` | `{env}` | {_default(getattr(defaults, name))} | {description} |")
    return rows


def _sop_class_keywords() -> dict[str, str]:
    """UID → pynetdicom's keyword (its public constants), for classes newer than pydicom's dictionary."""
    from pynetdicom import sop_class

    return {
        str(value): name
        for name, value in vars(sop_class).items()
        if isinstance(value, sop_class.SOPClass) and not name.startswith("_")
    }


def _default_of(function: Callable[..., Any], parameter: str) -> float:
    """A keyword's default, so the document shows what the code uses."""
    return float(inspect.signature(function).parameters[parameter].default)


def _uid_name(uid: str, fallback: str) -> str:
    name = UID(uid).name
    return fallback if name == uid else name


def conformance_markdown() -> str:
    """The DICOM conformance summary as Markdown."""
    from pynetdicom import AllStoragePresentationContexts
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelMove,
        Verification,
    )

    from service.config import DeliverySettings, DicomSettings
    from service.deliver.scu import OK_STATUSES, echo, send
    from service.dicom.ae import IMPLEMENTATION_CLASS_UID, implementation_version_name
    from service.errors import STOW_FAILURE_REASONS, InvalidInstanceError, SopInstanceConflictError
    from service.ingest.attempt import (
        STATUS_OUT_OF_RESOURCES,
        STATUS_PROCESSING_FAILURE,
        STATUS_SUCCESS,
        STATUS_UNEXPECTED,
    )
    from service.ingest.scp import storage_transfer_syntaxes
    from service.routing import _is_image_sop_class, load_rules
    from service.store.validate import OWN_MANUFACTURER

    dicom = DicomSettings()
    syntaxes = storage_transfer_syntaxes()
    keywords = _sop_class_keywords()
    storage = sorted(
        (
            (_uid_name(uid, keywords.get(uid, uid)), uid)
            for uid in (str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
        ),
        key=lambda item: (item[0].lower(), item[1]),
    )
    rules = load_rules(Path(__file__).with_name("routing_rules.yaml"))

    def analysis(uid: str) -> str:
        if UID(uid).name == uid:  # pydicom does not know the class: routing gives it the benefit of doubt
            return "image, if it has pixel data"
        return "image" if _is_image_sop_class(uid) else "stored only"

    out: list[str] = [
        "# DICOM conformance summary",
        "",
        "Generated from the code by `scripts/gen-docs` (`service/docs.py`); do not edit by hand:",
        "`tests/test_docs.py` fails when this file is out of date. Settings are shown with their defaults;",
        "each can be set in the environment (the variable shown) or in the YAML file named by",
        "`PACS_TRIAGE_CONFIG`.",
        "",
        "pacs-triage is one DICOM application entity: a storage SCP that receives studies to analyse (our",
        "own asyncio upper layer, `service/ingest/`, reusing pynetdicom's PDU codecs), and a storage SCU",
        "(pynetdicom) that sends the results (a Comprehensive 3D SR and a Secondary Capture preview) to the",
        "PACS.",
        "",
        "## 1. Application entity and listener",
        "",
        f"The listener's AE title is `{dicom.ae_title}` and its port {dicom.port} unless configured (TLS",
        "settings in section 4):",
        "",
        *_settings_table(
            "dicom", DicomSettings, [n for n in DicomSettings.model_fields if not n.startswith("tls")]
        ),
        "",
        "### 1.1 Implementation identification",
        "",
        "Sent by both roles, the listener in its A-ASSOCIATE-AC and the client in its A-ASSOCIATE-RQ",
        "(PS3.7 Annex D.3.3.2), so a peer's logs name pacs-triage and its version:",
        "",
        "| Item | Value |",
        "|---|---|",
        f"| Implementation Class UID | `{IMPLEMENTATION_CLASS_UID}` (a UUID-derived UID, PS3.5 B.2) |",
        f"| Implementation Version Name | `{implementation_version_name('X.Y.Z')}`, the release"
        " (e.g. `PACSTRIAGE_0.1.0`; at most 16 characters) |",
        "",
        "### 1.2 Timeouts",
        "",
        "| Role | Connection | Association (ACSE) | DIMSE message | Network idle |",
        "|---|---|---|---|---|",
        f"| Listener | {dicom.artim_seconds:g} s to a complete A-ASSOCIATE-RQ (ARTIM) |"
        f" {dicom.artim_seconds:g} s | {dicom.pdu_seconds:g} s per PDU from its first byte |"
        f" {dicom.idle_seconds:g} s |",
        *(
            f"| {role} | {seconds:g} s | {seconds:g} s | {seconds:g} s | {seconds:g} s |"
            for role, seconds in (
                ("Client: result delivery, `pacs-triage send`", _default_of(send, "timeout")),
                ("Client: `pacs-triage echo`, `pacs-triage check`", _default_of(echo, "timeout")),
            )
        ),
        "",
        "A delivery that times out is retried with backoff (section 3).",
        "",
        "## 2. Services as SCP",
        "",
        "| Service | SOP class | UID | Notes |",
        "|---|---|---|---|",
        f"| Verification | {UID(Verification).name} | `{Verification}` | C-ECHO, always answered 0x0000 |",
        f"| Storage | {len(storage)} storage SOP classes (section 2.1) | | C-STORE, the syntaxes of 2.2 |",
        "",
        "### 2.1 Storage SOP classes accepted",
        "",
        "Every storage SOP class pynetdicom knows is accepted, so a PACS forwarding whole studies never sees",
        "a refusal at negotiation. An instance is **analysed** only if it has pixel data (PixelData,",
        "FloatPixelData or DoubleFloatPixelData), its SOP class is an image class (column *Analysis*),",
        "and a routing rule matches its series (section 2.3). An object without pixel data (SR,",
        "presentation state, ...) is stored, answered 0x0000 and starts no analysis; an image series that",
        "cannot be analysed is listed in the study's result as not analysed, with why. Our own result",
        f"objects coming back (Manufacturer `{OWN_MANUFACTURER}`) are stored and never start an analysis.",
        "",
        "| SOP class | UID | Analysis |",
        "|---|---|---|",
        *(f"| {name} | `{uid}` | {analysis(uid)} |" for name, uid in storage),
        "",
        "### 2.2 Transfer syntaxes accepted",
        "",
        "Offered for every storage SOP class, in this order of preference: the uncompressed syntaxes, then",
        "each compressed one for which pydicom has a working decoder in this installation (the plug-ins in",
        "`pyproject.toml`: pylibjpeg, pylibjpeg-openjpeg, pylibjpeg-libjpeg). A sender with another syntax",
        "is told at negotiation, never after we accepted an instance we cannot read.",
        "",
        "| Transfer syntax | UID |",
        "|---|---|",
        *(f"| {UID(ts).name} | `{ts}` |" for ts in syntaxes),
        "",
        "### 2.3 Routing rules shipped",
        "",
        "From `service/routing_rules.yaml` (setting `routing_rules` replaces the file). A series matches",
        "when its Modality is listed, and its BodyPartExamined is listed or, without one, a keyword appears",
        "in its study or series description.",
        "",
        "| Rule | Modalities | Body parts | Keywords | Models |",
        "|---|---|---|---|---|",
        *(
            f"| {r.name} | {', '.join(r.modalities)} | {', '.join(r.body_parts) or 'any'} | "
            f"{', '.join(r.keywords) or '-'} | {', '.join(r.models)} |"
            for r in rules.rules
        ),
        "",
        "### 2.4 C-STORE response statuses (PS3.4 Annex B.2.3)",
        "",
        "A success is sent only once the instance is durable: written into a slot file made ahead and"
        " covered by an `fdatasync` (with `dicom.journal` off: its own file and directory fsynced). The slot"
        " is renamed into place and the database row follows in a group commit (a batch waits up to 20 ms"
        " for more instances; an association's end, or a series reaching the count it declares, does not"
        " wait), and a crash before that commit is"
        " repaired at the next start, before the listener opens (complete slots and files without a row are"
        " placed and re-indexed), so an acknowledged instance is never lost. The stored file's 128-byte"
        " preamble holds the slot's record (length and CRC-32; PS3.10 7.1 leaves the preamble to the"
        " implementation); with direct writes its dataset is followed by a Data Set Trailing Padding"
        " element (PS3.10 7.2) that ends the file on a 4 KiB boundary.",
        "Failures carry an ErrorComment (0000,0902).",
        "",
        "| Status | Meaning | When |",
        "|---|---|---|",
        f"| 0x{STATUS_SUCCESS:04X} | Success | stored durably, or already stored (same SOP Instance UID) |",
        f"| 0x{STATUS_OUT_OF_RESOURCES:04X} | Refused: Out of Resources | data disk above"
        " `retention.disk_high_watermark`, a write error, or more instances in the study than"
        " `api.max_instances_per_study`: try again later |",
        f"| 0x{SopInstanceConflictError.dimse_status:04X} | Error: Data Set does not match SOP Class"
        " (A9xx) | SOP Instance UID conflict: the UID is already stored in another study (never acknowledged"
        " and dropped) |",
        f"| 0x{InvalidInstanceError.dimse_status:04X} | Error: Cannot understand | not parseable, a missing"
        " or invalid UID, pixel data in a transfer syntax with no decoder, or a truncated dataset (a declared"
        " length beyond the bytes received; `store.keep_truncated` stores it, noted) |",
        f"| 0x{STATUS_PROCESSING_FAILURE:04X} | Failure: Processing failure | a failure of ours that has a"
        " name (an error of the service's own tree that is neither bad input nor out of resources) |",
        f"| 0x{STATUS_UNEXPECTED:04X} | Error: Cannot understand (Cxxx) | an unexpected error of ours (a bug,"
        " logged with its traceback); the code pynetdicom's SCP sends for an exception in its handler |",
        "| 0x0122 | Refused: SOP class not supported | the command's SOP class differs from its"
        " presentation context's |",
        "| 0x0211 | Unrecognized operation | a DIMSE request other than C-ECHO or C-STORE |",
        "",
        "A dataset larger than `dicom.max_dataset_bytes` is read to its end without being kept and",
        "answered 0xA700. An instance whose dataset did not arrive whole (A-ABORT, connection closed) is",
        "never stored.",
        "",
        "### 2.5 Association policy",
        "",
        "| Check | Setting | Default | On failure: A-ASSOCIATE-RJ (result, source, reason) |",
        "|---|---|---|---|",
        "| Calling AE title in the allow-list (empty list: any) | `dicom.allowed_calling_aets` |"
        f" {_default(dicom.allowed_calling_aets)} | rejected-permanent, service-user,"
        " calling-AE-title-not-recognized (1, 1, 3) |",
        f"| Called AE title is ours | `dicom.check_called_aet` | {_default(dicom.check_called_aet)} |"
        " rejected-permanent, service-user, called-AE-title-not-recognized (1, 1, 7) |",
        "| Concurrent associations at most | `dicom.max_associations` |"
        f" {_default(dicom.max_associations)} | rejected-transient, service-provider (presentation),"
        " local-limit-exceeded (2, 3, 2) |",
        "",
        "| Protocol version 1, DICOM application context | | | rejected-permanent, (1, 2, 2) or (1, 1, 2) |",
        "| A-ASSOCIATE-RQ well formed (every item length fits, UIDs and AE titles ASCII) | | |"
        " rejected-permanent, service-user, no-reason-given (1, 1, 1) |",
        "",
        "A connection counts as an association (`dicom.max_associations`) only once its A-ASSOCIATE-RQ",
        "has passed these checks, and its slot is free as soon as its socket closes. Before that it is",
        "*pending*:",
        f"at most `dicom.max_pending` ({dicom.max_pending}) pending connections, and"
        f" `dicom.max_pending_per_address` ({dicom.max_pending_per_address}) from one address; a new",
        "connection beyond either closes the oldest pending connection of the busiest address. A pending",
        f"connection has `dicom.artim_seconds` ({dicom.artim_seconds:g} s) to complete its request (ARTIM,",
        "PS3.8 9.1.4), and its PDU may not exceed `dicom.max_unassociated_pdu`"
        f" ({dicom.max_unassociated_pdu} bytes).",
        "",
        f"Maximum PDU length received: `dicom.max_pdu`, default {dicom.max_pdu} bytes (0: no limit but",
        "`dicom.max_dataset_bytes`). A PDU that declares more is answered with A-ABORT before any of its",
        f"body is read. Each PDU must arrive whole within `dicom.pdu_seconds` ({dicom.pdu_seconds:g} s) of",
        f"its first byte; an association with no PDU for `dicom.idle_seconds` ({dicom.idle_seconds:g} s)",
        "is aborted (a deadline is noticed within a quarter of the shortest of these clocks, at most 1 s,",
        "after it passed). Both sides may abort; A-RELEASE is answered once the last response is sent.",
        "",
        "Extended negotiation (PS3.7 D.3.3): the asynchronous operations window is answered 1/1 (one",
        "operation at a time); SCP/SCU role selection is answered per SOP class; user identity and SOP class",
        "extended negotiation are ignored (no response item). Rejected and aborted associations and closed",
        "pending connections are logged at WARNING with the offending peer's address (and AE titles once",
        "known).",
        "",
        "## 3. Services as SCU",
        "",
        "Results are sent to each of `delivery.destinations` through a persisted outbox (retried with",
        "backoff, dead-lettered after `delivery.max_attempts`; `POST /v1/deliveries/{id}/retry` re-queues).",
        "`pacs-triage echo` is a Verification SCU for checking a peer by hand; `pacs-triage send` sends any",
        "files as they are stored.",
        "",
        "| Object | SOP class | UID | Setting |",
        "|---|---|---|---|",
        f"| Result report (TID 1500) | {UID(Comprehensive3DSRStorage).name} | `{Comprehensive3DSRStorage}`"
        " | `delivery.send_sr` |",
        f"| Preview of the key image | {UID(SecondaryCaptureImageStorage).name} |"
        f" `{SecondaryCaptureImageStorage}` | `delivery.send_preview` |",
        f"| Key images of positive findings (TID 2010) | {UID(KeyObjectSelectionDocumentStorage).name} |"
        f" `{KeyObjectSelectionDocumentStorage}` | `delivery.send_kos` |",
        "| Boxes of positive findings over the original images |"
        f" {UID(GrayscaleSoftcopyPresentationStateStorage).name} |"
        f" `{GrayscaleSoftcopyPresentationStateStorage}` | `delivery.send_gsps` |",
        f"| Mask of a measured positive finding | {UID(SegmentationStorage).name} | `{SegmentationStorage}`"
        " | `delivery.send_seg` |",
        "",
        f"All are written in {UID(ExplicitVRLittleEndian).name} (`{ExplicitVRLittleEndian}`) and",
        f"proposed in one presentation context offering it and {UID(ImplicitVRLittleEndian).name}"
        f" (`{ImplicitVRLittleEndian}`).",
        "A C-STORE answered with "
        + ", ".join(f"0x{code:04X}" for code in sorted(OK_STATUSES))
        + " counts as",
        "delivered (success, and the warnings under which the object was stored); any other status is",
        "retried.",
        "",
        *_settings_table(
            "delivery",
            DeliverySettings,
            [n for n in DeliverySettings.model_fields if not n.startswith("tls")],
        ),
        "",
        "### 3.1 Content of the objects we create",
        "",
        "Every object goes into the study it describes (its Study Instance UID), each in a new series, and",
        "copy the patient and study attributes of the source image unchanged (highdicom); nothing else that",
        f"identifies the patient is written. Manufacturer is `{OWN_MANUFACTURER}`.",
        "",
        "- **SR** (TID 1500 Measurement Report): observation context with a device observer",
        "  (TID 1004) naming the models; per finding an image-level measurement group (TID 1501) with the",
        "  probability (DCM 122157), a qualitative evaluation Present/Absent from the model's threshold, the",
        "  key image and the algorithm identification (TID 4019: model name, version; parameters threshold,",
        "  sha256, card and preprocessing versions, pacs-triage version, execution provider);",
        "  per detection a planar ROI group (TID 1410) with a closed polyline around the box; per",
        "  measured segment a volumetric ROI group (TID 1411) referencing the SEG segment, with Volume",
        "  (SCT 118565006, UCUM ml) and Diameter (SCT 81827009, UCUM mm, largest axial diameter);",
        "  comments saying the result is not for diagnostic use, its status, the lesions measured and",
        "  every 'not analysed' reason.",
        "  PreliminaryFlag PRELIMINARY, VerificationFlag UNVERIFIED, CompletionFlag COMPLETE only for a",
        "  complete result.",
        "- **Preview** (Secondary Capture, RGB): the key image windowed as a reader sees it, the detections",
        '  drawn and labelled with their score, under a banner that starts "NOT FOR DIAGNOSTIC USE";',
        "  BurnedInAnnotation YES, ImageType DERIVED\\SECONDARY, ConversionType WSD, the source frame in",
        "  SourceImageSequence.",
        "- **Segmentation** (`delivery.send_seg`): BINARY, one per segmented series of a positive finding,",
        "  referencing every segmented source slice; segment category SCT 49755003 Morphologically abnormal",
        "  structure, type the finding's code (SCT 1386000 Intracranial hemorrhage), algorithm AUTOMATIC",
        "  with the model name, version, threshold and sha256; empty frames omitted; never for a negative",
        "  study.",
        "- **Key Object Selection** (TID 2010, `delivery.send_kos`): title DCM 113000 Of Interest, a device",
        "  observer, and the key image of every positive finding (none: no KOS).",
        "- **Grayscale Softcopy Presentation State** (`delivery.send_gsps`): each box of a positive finding",
        "  as a closed POLYLINE in PIXEL units on its image and frame, labelled with the finding and score,",
        "  in graphic layer AI; the images' own window as the softcopy VOI LUT; pixels untouched (no box: no",
        "  GSPS).",
        "",
        "### 3.2 Query/Retrieve SCU: pull by accession",
        "",
        "`pacs-triage retrieve` and `POST /v1/retrievals` (sources: `dicom.retrieve_sources`) find a study",
        "with C-FIND and have the source C-MOVE it to our AE title; the instances arrive at the listener",
        "(section 2) and take the normal path. Keys: AccessionNumber or StudyInstanceUID, one exact value.",
        "",
        "| Service | SOP class | UID | Level |",
        "|---|---|---|---|",
        f"| C-FIND | {UID(StudyRootQueryRetrieveInformationModelFind).name} |"
        f" `{StudyRootQueryRetrieveInformationModelFind}` | STUDY |",
        f"| C-MOVE | {UID(StudyRootQueryRetrieveInformationModelMove).name} |"
        f" `{StudyRootQueryRetrieveInformationModelMove}` | STUDY |",
        f"| C-GET (API, `method: get`) | {UID(StudyRootQueryRetrieveInformationModelGet).name} |"
        f" `{StudyRootQueryRetrieveInformationModelGet}` | STUDY; storage SOP classes proposed with the"
        " SCP role (PS3.7 D.3.3.4) |",
        "",
        "No match is an error (HTTP 404, exit status 1), not an empty success; a C-MOVE failure status is",
        "reported in words (0xA801: our AE title is not a known move destination there).",
        "",
        "A source given as a DICOMweb base URL (`https://host/dicom-web`) is searched with QIDO-RS",
        "(`GET {base}/studies?AccessionNumber=` or `StudyInstanceUID=`, PS3.18 10.6) and the study fetched",
        "with WADO-RS Retrieve Study (PS3.18 10.4); each instance is stored durably (the API) or C-STOREd to",
        "the listener (`pacs-triage retrieve --store-to`) before it counts.",
        "",
        "## 4. Security",
        "",
        "DICOM TLS (PS3.15 Annex B) for the listener and for delivery, off by default:",
        "",
        *_settings_table(
            "dicom", DicomSettings, [n for n in DicomSettings.model_fields if n.startswith("tls")]
        ),
        "",
        *_settings_table(
            "delivery", DeliverySettings, [n for n in DeliverySettings.model_fields if n.startswith("tls")]
        ),
        "",
        "Without TLS, who may send is decided by the association policy of section 2.5 only: AE titles are",
        "not authentication, so keep the listener on a trusted network.",
        "",
        "## 5. Character sets",
        "",
        "Received datasets are stored byte for byte, whatever their Specific Character Set (0008,0005)"
        " (with direct writes, followed by a Data Set Trailing Padding element, PS3.10 7.2: docs/deploy.md);",
        "the few text attributes the service reads for its own records (accession number, descriptions)",
        "are decoded with that character set (pydicom).",
        "The objects we create carry the Specific Character Set of their source image, because the patient",
        "and study attributes they copy are encoded in it; the text we add (codes, model names, comments) is",
        "ASCII, which every character set includes.",
        "",
        "## 6. DICOMweb (PS3.18)",
        "",
        "At `/dicomweb`, behind the API's bearer tokens (reader: QIDO-RS and WADO-RS; admin: STOW-RS):",
        "",
        "| Transaction | Resources | Media types |",
        "|---|---|---|",
        "| STOW-RS (10.5) | `POST /studies`, `/studies/{study}` |"
        ' `multipart/related; type="application/dicom"` in, `application/dicom+json` out |',
        "| QIDO-RS (10.6) | `GET /studies`, `/studies/{study}/series`, `/studies/{study}/instances`,"
        " `/studies/{study}/series/{series}/instances` | `application/dicom+json` |",
        "| WADO-RS (10.4) | `GET /studies/{study}[/series/{series}[/instances/{sop}]]` |"
        ' `multipart/related; type="application/dicom"` (`transfer-syntax=*`: as stored; default'
        f" {UID(ExplicitVRLittleEndian).name}) |",
        "| WADO-RS metadata (10.4) | the same, plus `/metadata` | `application/dicom+json` |",
        "| WADO-RS frames (10.4) | `.../instances/{sop}/frames/{list}` |"
        ' `multipart/related; type="application/octet-stream"` (decoded, Explicit VR Little Endian) |',
        "",
        "STOW-RS stores what C-STORE stores (section 2.1) and answers 200 (all stored), 202 (some) or 409",
        "(none), each refused instance in FailedSOPSequence with its FailureReason. A SOP Instance UID",
        "already stored with the same content is a retry (success); with other content, or in another",
        "study, it is refused with 0xA900 and nothing is stored or replaced.",
        "",
        "| FailureReason | Meaning |",
        "|---|---|",
        *(f"| 0x{code:04X} | {words} |" for code, words in sorted(STOW_FAILURE_REASONS.items())),
        "",
        "QIDO-RS and WADO-RS serve the received instances and our own SR and preview objects alike.",
        "",
    ]
    if not any(n.startswith("tls") for n in DicomSettings.model_fields):
        raise RuntimeError("DicomSettings has no tls_* settings: update service/docs.py section 4")
    return "\n".join(out)


def write_docs(directory: Path) -> list[Path]:
    """Write the generated documents into ``directory``; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (
        (OPENAPI_FILE, openapi_json()),
        (CONFORMANCE_FILE, conformance_markdown()),
        (CARD_SCHEMA_FILE, card_schema_json()),
    ):
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    directory = Path(args[0]) if args else Path("docs")
    for path in write_docs(directory):
        sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
