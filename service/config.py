"""Service settings: one pydantic-settings class, built once in the app factory and passed down.

Sources, highest priority first: keyword arguments (tests), environment variables ``PACS_TRIAGE_*`` with
``__`` between a group and its field (``PACS_TRIAGE_INFERENCE__MAX_BATCH=16``), files named by
``PACS_TRIAGE_*_FILE`` variables (Docker and Kubernetes secrets: ``PACS_TRIAGE_AUTH__ADMIN_TOKENS_FILE=
/run/secrets/admin_tokens`` holds what ``PACS_TRIAGE_AUTH__ADMIN_TOKENS`` would), a YAML file named by
``PACS_TRIAGE_CONFIG`` (same nesting as the groups below), then the defaults. Every field is listed in the
README's configuration table; a test checks that the table and this module agree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from service.secret_files import EnvWithoutFileNames, secret_files

__all__ = [
    "ApiSettings",
    "AssemblySettings",
    "AuthSettings",
    "DeliverySettings",
    "DicomSettings",
    "InferenceSettings",
    "NotifySettings",
    "DriftSettings",
    "RetentionSettings",
    "Settings",
    "StoreSettings",
    "WorkerSettings",
    "WorklistSettings",
]

CONFIG_ENV = "PACS_TRIAGE_CONFIG"


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ApiSettings(_Group):
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
        10.0, gt=0, description="a connection whose request headers are not complete by then is closed"
    )
    body_timeout_seconds: float = Field(
        300.0, gt=0, description="a request body not fully received this long after the headers gets 408"
    )
    body_idle_seconds: float = Field(
        30.0, gt=0, description="a request body with no new bytes for this long gets 408 (slow senders)"
    )
    keepalive_seconds: int = Field(5, gt=0, description="an idle keep-alive connection is closed after this")
    max_concurrent_uploads: int = Field(
        16, gt=0, description="request bodies received at once (over 64 KiB or chunked); more get 503"
    )


class AuthSettings(_Group):
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


class StoreSettings(_Group):
    """Where instances and the job database live."""

    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<data_dir>/pacs-triage.db"
    )
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL",
        description="SQLite PRAGMA synchronous in WAL mode; FULL so a committed row survives power loss",
    )
    keep_truncated: bool = Field(
        False,
        description="store datasets whose declared lengths exceed their bytes (noted) instead of refusing",
    )


class InferenceSettings(_Group):
    """ONNX Runtime engine and micro-batcher."""

    max_batch: int = Field(8, gt=0, description="largest micro-batch sent to one session run")
    max_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits for company before running")
    providers: Literal["auto", "cpu", "cuda"] = Field("auto", description="execution provider choice")
    intra_op_threads: int = Field(0, ge=0, description="ORT intra-op threads; 0 lets ORT decide")
    debug_delay_ms: float = Field(
        0.0, ge=0, description="TEST ONLY: sleep this long in the worker before inference (crash tests)"
    )
    remote_models: dict[str, Annotated[str, Field(pattern=r"^https?://\S+$")]] = Field(
        default_factory=dict,
        description="models run by a KServe v2 server (Triton, MLServer): name → base URL (JSON object)",
    )


class AssemblySettings(_Group):
    """When a study counts as complete."""

    quiet_seconds: float = Field(
        5.0, ge=0, description="a study with no new instance for this long is complete (DICOM ingest)"
    )
    complete_when_full: bool = Field(
        True,
        description="a study is complete at once when every image series has the instances it declares"
        " (ImagesInAcquisition)",
    )
    complete_on_association_end: bool = Field(
        True,
        description="a study is complete at once when the association that sent it is released and none of"
        " its associations is open, for single-image modalities (CR, DX, MG, ...) and full series",
    )
    hold_while_associated: bool = Field(
        True,
        description="a series that has fewer instances than it declares waits while an association of its"
        " study is open, instead of the quiet timer (a busy sender or receiver pauses longer than it)",
    )
    max_hold_seconds: float = Field(
        600.0,
        gt=0,
        description="the longest such a study waits after its last instance before it is analysed anyway"
        " (then labelled incomplete)",
    )


class DicomSettings(_Group):
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
        4, gt=0, description="threads writing received instances, so several associations' fsyncs overlap"
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
        description="answer a C-STORE once the instance is appended to a data journal under"
        " <data_dir>/journal (one fdatasync) and write its file in the background; false: once its own"
        " file and directory are fsynced (two syncs per instance)",
    )
    journal_segment_mib: int = Field(
        64, ge=1, le=4096, description="size of one preallocated data-journal segment, MiB"
    )
    journal_place_delay_seconds: float = Field(
        0.0,
        ge=0,
        le=600,
        description="testing only: hold the background placement of journalled instances this long (the"
        " crash test widens the window between a C-STORE's success and its file); 0 in production",
    )
    retrieve_sources: list[str] = Field(
        default_factory=list,
        description='PACS that POST /v1/retrievals may pull from, as "AE@host:port" or as a DICOMweb base URL'
        ' "https://host/path" (JSON list); empty: none',
    )


class DeliverySettings(_Group):
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


class WorklistSettings(_Group):
    """How AI findings reorder the radiologist's worklist."""

    priorities: dict[str, Literal["stat", "urgent", "routine"]] = Field(
        default_factory=dict,
        description="priority of a positive finding by 'model/label' (JSON object); default: the card",
    )
    max_wait_minutes: float = Field(
        120.0,
        ge=0,
        description="routine studies waiting longer are promoted to urgent (starvation guard); 0: off",
    )


class NotifySettings(_Group):
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


class RetentionSettings(_Group):
    """How the service looks after its own disk."""

    instance_days: float = Field(
        0.0, ge=0, description="remove instance files of delivered studies after this many days; 0 keeps them"
    )
    check_interval_seconds: float = Field(3600.0, gt=0, description="how often the retention sweep runs")
    disk_high_watermark: float = Field(
        0.95,
        gt=0,
        le=1,
        description="above this fraction of the data disk used, new instances are refused (507 / 0xA700)",
    )


class WorkerSettings(_Group):
    """Job workers."""

    concurrency: int = Field(4, gt=0, description="jobs processed at the same time (they share the engine)")
    poll_seconds: float = Field(0.5, gt=0, description="how often idle workers look for jobs")
    max_attempts: int = Field(3, gt=0, description="a job that failed this many times is marked failed")
    lease_seconds: float = Field(
        60.0, gt=0, description="a running job is given back if its worker stops heart-beating this long"
    )
    ready_max_backlog: int = Field(
        0, ge=0, description="/healthz/ready answers 503 while more jobs than this wait (0: report only)"
    )


class DriftSettings(_Group):
    """Drift alarms per model (service/lifecycle/drift.py): inputs and scores against a reference."""

    enabled: bool = Field(True, description="watch each model's inputs and scores for drift and silence")
    reference_series: int = Field(
        300,
        ge=10,
        description="for a card without a drift reference: series per model, after start, that form "
        "its reference distribution",
    )
    window_series: int = Field(
        300, ge=10, description="latest series per model compared with the reference (a sliding window)"
    )
    check_every: int = Field(10, gt=0, description="series between two PSI computations of a model")
    psi_threshold: float = Field(
        0.25, gt=0, description="a feature whose population stability index exceeds this raises the alarm"
    )
    silence_hours: float = Field(
        24.0, gt=0, description="a model that received studies and none for this long raises an alarm"
    )


class Settings(BaseSettings):
    """All settings of the service. See the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix="PACS_TRIAGE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    models_dir: Path = Field(Path("models"), description="folder of models/<name>/card.json + model.onnx")
    data_dir: Path = Field(Path("var"), description="instances, database and other state")
    routing_rules: Path | None = Field(
        None, description="routing rules YAML; default service/routing_rules.yaml"
    )
    site_thresholds: Path | None = Field(
        None,
        description="per-site label thresholds (written by 'pacs-triage models calibrate'); "
        "default <data_dir>/site-thresholds.yaml",
    )
    log_level: str = Field("INFO", description="root log level set by 'pacs-triage serve'")
    log_format: Literal["text", "json"] = Field(
        "text", description="log output of 'pacs-triage serve': text lines, or one JSON object per line"
    )
    role: Literal["all", "api", "listener", "worker"] = Field(
        "all",
        description="what this process runs: all, or one part of a scale-out on a shared PostgreSQL",
    )
    api: ApiSettings = Field(default_factory=ApiSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    assembly: AssemblySettings = Field(default_factory=AssemblySettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    worklist: WorklistSettings = Field(default_factory=WorklistSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)

    @model_validator(mode="after")
    def _normalise(self) -> Settings:
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"log_level {self.log_level!r} is not a logging level name")
        self.log_level = self.log_level.upper()
        return self

    @property
    def database_url(self) -> str:
        """The store URL, defaulting to a SQLite file under ``data_dir``."""
        if self.store.database_url:
            return self.store.database_url
        return f"sqlite:///{(self.data_dir / 'pacs-triage.db').resolve()}"

    @property
    def site_thresholds_path(self) -> Path:
        """The site-thresholds file (service/lifecycle/site_thresholds.py); need not exist."""
        return self.site_thresholds or self.data_dir / "site-thresholds.yaml"

    @property
    def instances_dir(self) -> Path:
        return self.data_dir / "instances"

    @property
    def journal_dir(self) -> Path:
        """The DICOM listener's data journal (:mod:`service.store.journal`)."""
        return self.data_dir / "journal"

    @property
    def runs_workers(self) -> bool:
        """Inference workers and the delivery, notification and retention loops run in this process."""
        return self.role in ("all", "worker")

    @property
    def runs_listener(self) -> bool:
        return self.role in ("all", "listener") and self.dicom.enabled

    @property
    def outputs_dir(self) -> Path:
        """Where the SR and preview objects we create are kept until delivered."""
        return self.data_dir / "outputs"

    @property
    def routing_rules_path(self) -> Path:
        return self.routing_rules or Path(__file__).with_name("routing_rules.yaml")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - signature fixed by pydantic-settings
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Env beats ``*_FILE`` secrets beat YAML beat defaults; no .env or secrets directory."""
        secrets, names = secret_files(settings_cls, os.environ)
        return (
            init_settings,
            EnvWithoutFileNames(settings_cls, env_settings, names),
            InitSettingsSource(settings_cls, init_kwargs=secrets),
            _YamlSource(settings_cls),
        )


class _YamlSource(InitSettingsSource):
    """The YAML file named by ``PACS_TRIAGE_CONFIG``, if any, as one more init source."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls, init_kwargs=_read_yaml(os.environ.get(CONFIG_ENV)))


def _read_yaml(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the configuration file must hold a mapping")
    return data
