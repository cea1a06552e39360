"""Settings of the service's doors and peers: the HTTP API and who may call it, the DICOM listener,
delivery of results to the PACS, notifications to people and systems.

One class per section of :class:`service.config.Settings` (``PACS_TRIAGE_<SECTION>__<FIELD>``); each field's
description is what the README's configuration table shows. The sections of what happens inside, between
those doors, are in :mod:`service.config.pipeline`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator

from service.config.group import SettingsGroup

__all__ = ["ApiSettings", "AuthSettings", "DeliverySettings", "DicomSettings", "NotifySettings"]


class ApiSettings(SettingsGroup):
    """HTTP listener and request limits."""

    host: str = Field("127.0.0.1", description="address uvicorn binds; loopback unless put behind a proxy")
    port: int = Field(8000, ge=0, le=65535, description="TCP port of the HTTP API")
    max_body_bytes: int = Field(
        512 * 1024 * 1024, gt=0, description="largest POST body accepted; larger gets 413"
    )
    max_wait_seconds: float = Field(
        60.0, ge=0, description="cap on the N of 'Prefer: wait=N', so a client cannot hold a worker forever"
    )
    max_instances_per_study: int = Field(
        10_000, gt=0, description="instances one study may have; more gets 413 (HTTP) or 0xA700 (DICOM)"
    )
    header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="a request head not complete this long after its connection opened, or after its first"
        " byte on a kept-alive connection, gets 408 and the connection is closed",
    )
    body_timeout_seconds: float = Field(
        300.0, gt=0, description="a request body not fully received this long after the headers gets 408"
    )
    body_idle_seconds: float = Field(
        30.0, gt=0, description="a request body with no new bytes for this long gets 408 (slow senders)"
    )
    keepalive_seconds: int = Field(
        75,
        gt=0,
        description="an idle keep-alive connection is closed after this; longer than clients keep theirs"
        " (httpx 5 s, aiohttp 15 s), as nginx's 75 s, so the server never closes one as a client reuses it",
    )
    max_concurrent_uploads: int = Field(
        16, gt=0, description="request bodies received at once (over 64 KiB or chunked); more get 503"
    )
    upload_memory_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="a request's instances held in memory (analysed in one pass) up to this size; past it"
        " each is written to disk as it arrives and the study is analysed from its files",
    )


class AuthSettings(SettingsGroup):
    """Who may call the HTTP API: bearer tokens with a role, from the environment or a file of hashes."""

    open: bool = Field(
        False, description="no authentication at all; only for local use (scripts/serve sets it on loopback)"
    )
    admin_tokens: list[SecretStr] = Field(
        default_factory=list, description="tokens with the admin role (JSON list; from the environment)"
    )
    reader_tokens: list[SecretStr] = Field(
        default_factory=list, description="tokens with the reader role (JSON list; from the environment)"
    )
    tokens_file: Path | None = Field(
        None, description="file of 'role name sha256-of-token' lines (no plain tokens on disk)"
    )
    min_token_length: int = Field(
        24, ge=1, description="shortest token accepted in admin_tokens/reader_tokens and by hash-token"
    )
    failed_auth_burst: int = Field(
        10, gt=0, description="wrong tokens one client address may present before it gets 429"
    )
    failed_auth_per_minute: float = Field(
        6.0, gt=0, description="rate at which a client address earns back wrong-token attempts"
    )
    oidc_issuer: str | None = Field(
        None, description="OIDC issuer (iss) of bearer JWTs for people; unset: static tokens only"
    )
    oidc_audience: str | None = Field(None, description="audience (aud) the JWTs must be issued for")
    oidc_jwks: str | None = Field(
        None, description="the issuer's JWKS: an https:// URL (cached) or a file path"
    )
    oidc_roles_claim: str = Field(
        "roles", description="claim holding the user's roles; dots walk into objects (realm_access.roles)"
    )
    oidc_admin_roles: list[str] = Field(
        default_factory=list, description="claim values that give the admin role (JSON list)"
    )
    oidc_reader_roles: list[str] = Field(
        default_factory=list, description="claim values that give the reader role (JSON list)"
    )
    oidc_name_claim: str = Field(
        "preferred_username", description="claim naming the user in the audit trail (else sub)"
    )
    oidc_algorithms: list[str] = Field(
        default_factory=lambda: ["RS256"], description="JWS algorithms accepted (JSON list; never none)"
    )

    @model_validator(mode="after")
    def _oidc_complete(self) -> AuthSettings:
        if self.oidc_issuer and not (self.oidc_audience and self.oidc_jwks):
            raise ValueError("auth.oidc_issuer needs auth.oidc_audience and auth.oidc_jwks as well")
        if any(a.lower() == "none" or a.upper().startswith("HS") for a in self.oidc_algorithms):
            raise ValueError("auth.oidc_algorithms: only public-key algorithms (RS*, PS*, ES*, EdDSA)")
        return self


class DicomSettings(SettingsGroup):
    """The DICOM listener (C-ECHO, C-STORE SCP)."""

    enabled: bool = Field(True, description="run the C-STORE listener inside 'pacs-triage serve'")
    ae_title: str = Field("PACS_TRIAGE", min_length=1, max_length=16, description="our AE title")
    host: str = Field(
        "127.0.0.1", description="address the listener binds; 0.0.0.0 to accept modalities on the network"
    )
    port: int = Field(11112, ge=0, le=65535, description="DICOM port; 0 picks a free one (tests)")
    allowed_calling_aets: list[str] = Field(
        default_factory=list,
        description="calling AE titles allowed to associate (JSON list); empty allows any",
    )
    check_called_aet: bool = Field(
        True, description="reject associations whose called AE title is not ours (a misrouted sender)"
    )
    max_pdu: int = Field(
        262144, ge=0, description="largest PDU we receive, bytes (0 = no limit); bigger is faster"
    )
    max_associations: int = Field(16, gt=0, description="concurrent associations accepted")
    tls_cert_file: Path | None = Field(None, description="PEM certificate: with the key, the listener is TLS")
    tls_key_file: Path | None = Field(None, description="PEM private key of the listener certificate")
    tls_ca_file: Path | None = Field(None, description="PEM CA bundle that client certificates must chain to")
    tls_require_client_cert: bool = Field(
        False, description="refuse TLS clients without a certificate from tls_ca_file"
    )
    artim_seconds: float = Field(
        5.0,
        gt=0,
        description="time a new connection has to send its A-ASSOCIATE-RQ, and a peer to close after"
        " a release or abort (ARTIM, PS3.8 9.1.4)",
    )
    pdu_seconds: float = Field(
        5.0, gt=0, description="deadline from the first byte of a PDU to its last; a half-sent PDU is aborted"
    )
    idle_seconds: float = Field(60.0, gt=0, description="an association with no PDU for this long is aborted")
    max_pending: int = Field(
        32, gt=0, description="connections not yet associated, overall; more close the oldest silent one"
    )
    max_pending_per_address: int = Field(
        8, gt=0, description="connections not yet associated from one address; more close its oldest"
    )
    max_unassociated_pdu: int = Field(
        131072, ge=1024, description="largest PDU accepted before association (the A-ASSOCIATE-RQ), bytes"
    )
    max_dataset_bytes: int = Field(
        512 * 1024 * 1024,
        gt=0,
        description="largest C-STORE dataset; a bigger one is read, discarded and answered 0xA700",
    )
    store_threads: int = Field(
        4,
        gt=0,
        description="threads checking and writing received instances, so several associations' fsyncs"
        " overlap (with one or two associations open, the listener's own loop writes each instance while"
        " one of these checks it)",
    )
    processes: int = Field(
        1,
        ge=1,
        le=16,
        description="processes receiving DICOM: above 1, this one accepts each connection and serves it or"
        " hands it to the least busy of the others, which write their instances into slots of their own"
        " (rows, duplicates and association ends stay here), so several senders use several cores; the"
        " association and waiting-connection limits are shared out among them. Needs dicom.journal",
    )
    commit_delay_seconds: float = Field(
        0.0,
        ge=0,
        le=600,
        description="testing only: hold each group commit of received instances' rows this long (the crash"
        " test widens the window between a C-STORE's success and its row); 0 in production",
    )
    journal: bool = Field(
        True,
        description="answer a C-STORE once the instance is written into a slot file made ahead under"
        " <data_dir>/slots (one fdatasync) and rename it into place in the background; false: once its own"
        " file and directory are fsynced (two syncs per instance)",
    )
    direct_io: bool = Field(
        True,
        description="write each received instance into its slot with O_DIRECT, past the page cache (no copy"
        " on the answer path; its first read, the analysis, then comes from the disk); false, or a file"
        " system that refuses O_DIRECT: through the page cache",
    )
    journal_segment_mib: int = Field(
        64,
        ge=1,
        le=4096,
        description="ignored: the segment journal it sized was replaced by slots (one write per instance);"
        " accepted so that older configuration files still load",
    )
    journal_place_delay_seconds: float = Field(
        0.0,
        ge=0,
        le=600,
        description="testing only: hold the background placement of received instances this long (the"
        " crash test widens the window between a C-STORE's success and its file); 0 in production",
    )
    retrieve_sources: list[str] = Field(
        default_factory=list,
        description='PACS that POST /v1/retrievals may pull from, as "AE@host:port" or as a DICOMweb base URL'
        ' "https://host/path" (JSON list); empty: none',
    )


class DeliverySettings(SettingsGroup):
    """Results sent back to the PACS as DICOM (SR, preview), through a persisted outbox."""

    destinations: list[str] = Field(
        default_factory=list,
        description='C-STORE destinations as "AE@host:port" (JSON list); empty sends nothing',
    )
    send_sr: bool = Field(True, description="send the TID 1500 Comprehensive 3D SR")
    send_preview: bool = Field(True, description="send the Secondary Capture preview of the key image")
    send_seg: bool = Field(
        True, description="send a DICOM SEG of each positive finding's mask (never for a negative study)"
    )
    send_kos: bool = Field(
        False, description="also send a Key Object Selection flagging positive findings' key images (IHE AIR)"
    )
    send_gsps: bool = Field(
        False,
        description="also send a Grayscale Softcopy Presentation State drawing the detections' boxes over the"
        " original images (IHE AIR); with send_preview false, boxes are never burned into pixels",
    )
    max_attempts: int = Field(8, gt=0, description="attempts before an object is dead-lettered")
    backoff_seconds: float = Field(2.0, gt=0, description="first retry delay; doubles on each attempt")
    backoff_max_seconds: float = Field(300.0, gt=0, description="cap on the retry delay")
    calling_ae: str = Field(
        "", max_length=16, description="AE title we call destinations with; default the listener's"
    )
    tls: bool = Field(False, description="use DICOM TLS to every destination")
    tls_ca_file: Path | None = Field(None, description="PEM CA bundle destination certificates chain to")
    tls_cert_file: Path | None = Field(None, description="PEM client certificate, for destinations asking")
    tls_key_file: Path | None = Field(None, description="PEM private key of the client certificate")


class NotifySettings(SettingsGroup):
    """Who hears about flags: webhooks (urgent flags), escalation, HL7 v2 to the RIS, FHIR."""

    webhooks: list[str] = Field(
        default_factory=list, description="URLs that get a signed JSON POST for every urgent or stat flag"
    )
    webhook_secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key for the X-PACS-Triage-Signature header (from the environment)"
    )
    escalation_minutes: float = Field(
        0.0, ge=0, description="urgent/stat flag not acknowledged this long → escalation webhooks; 0: off"
    )
    escalation_webhooks: list[str] = Field(
        default_factory=list, description="URLs notified when a flag is not acknowledged in time"
    )
    hl7_endpoints: list[str] = Field(
        default_factory=list, description='RIS MLLP endpoints "host:port" that get ORU^R01 for each result'
    )
    fhir_base_url: str | None = Field(None, description="FHIR R4 base URL for DiagnosticReport + Flag")
    max_attempts: int = Field(8, gt=0, description="attempts per notification before it is dead-lettered")
    backoff_seconds: float = Field(2.0, gt=0, description="first retry delay; doubles on each attempt")
    timeout_seconds: float = Field(10.0, gt=0, description="per-attempt network timeout")
