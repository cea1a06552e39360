"""Service settings: one pydantic-settings class, built once in the app factory and passed down.

This package: :class:`Settings` (the root, and where its values come from) here; its sections in
:mod:`service.config.interfaces` (HTTP, auth, DICOM, delivery, notifications) and
:mod:`service.config.pipeline` (store, inference, assembly, workers, worklist, retention, drift), each a
:class:`~service.config.group.SettingsGroup`; the ``*_FILE`` secrets in :mod:`service.config.secret_files`.
``service.config`` is the import path of every settings class (``__all__`` below), as ``service.errors`` is
of every error: the hot path and the benchmarks import the sections from here, and which module of the
package defines one is not their business.

Sources, highest priority first: keyword arguments (tests), environment variables ``PACS_TRIAGE_*`` with
``__`` between a group and its field (``PACS_TRIAGE_INFERENCE__MAX_BATCH=16``), files named by
``PACS_TRIAGE_*_FILE`` variables (Docker and Kubernetes secrets: ``PACS_TRIAGE_AUTH__ADMIN_TOKENS_FILE=
/run/secrets/admin_tokens`` holds what ``PACS_TRIAGE_AUTH__ADMIN_TOKENS`` would), a YAML file named by
``PACS_TRIAGE_CONFIG`` (same nesting as the sections), then the defaults. Every field is listed in the
README's configuration table; a test checks that the table and this package agree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from service.config.interfaces import (
    ApiSettings,
    AuthSettings,
    DeliverySettings,
    DicomSettings,
    NotifySettings,
)
from service.config.pipeline import (
    AssemblySettings,
    DriftSettings,
    InferenceSettings,
    RetentionSettings,
    StoreSettings,
    WorkerSettings,
    WorklistSettings,
)
from service.config.secret_files import EnvWithoutFileNames, secret_files

__all__ = [
    "CONFIG_ENV",
    "ApiSettings",
    "AssemblySettings",
    "AuthSettings",
    "DeliverySettings",
    "DicomSettings",
    "DriftSettings",
    "InferenceSettings",
    "NotifySettings",
    "RetentionSettings",
    "Settings",
    "StoreSettings",
    "WorkerSettings",
    "WorklistSettings",
]

CONFIG_ENV = "PACS_TRIAGE_CONFIG"


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
    def slots_dir(self) -> Path:
        """The DICOM listener's slot files (:mod:`service.store.slots`)."""
        return self.data_dir / "slots"

    @property
    def legacy_journal_dir(self) -> Path:
        """The segment journal of versions before session 20, read once at start
        (:mod:`service.store.journal_legacy`)."""
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
        return self.routing_rules or Path(__file__).resolve().parents[1] / "routing_rules.yaml"

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
