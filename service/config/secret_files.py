"""Settings from files: ``PACS_TRIAGE_<SETTING>_FILE=/run/secrets/...``, as Docker and Kubernetes mount them.

A secret in an environment variable shows in ``docker inspect``, ``/proc/<pid>/environ`` and crash reports;
a file mounted from a secret store does not. The convention (``POSTGRES_PASSWORD_FILE`` in the official
images) is one variable naming the file that holds the value. :func:`secret_files` reads them for
:class:`service.config.Settings`, which puts them between the environment and the YAML file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

__all__ = ["EnvWithoutFileNames", "secret_files"]

PREFIX = "PACS_TRIAGE_"
SUFFIX = "_FILE"


class EnvWithoutFileNames(PydanticBaseSettingsSource):
    """The environment source less the ``*_FILE`` variables already read as secrets.

    pydantic-settings turns ``PACS_TRIAGE_AUTH__ADMIN_TOKENS_FILE`` into the group key ``admin_tokens_file``,
    which ``extra="forbid"`` refuses; the file's content is the value of ``admin_tokens`` instead.
    """

    def __init__(
        self, settings_cls: type[BaseSettings], env: PydanticBaseSettingsSource, names: list[list[str]]
    ) -> None:
        super().__init__(settings_cls)
        self.env = env
        self.names = names

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:  # noqa: ARG002
        return None, field_name, False  # unused: __call__ delegates to the environment source

    def __call__(self) -> dict[str, Any]:
        data = self.env()
        for *groups, leaf in self.names:
            node: Any = data
            for group in groups:
                node = node.get(group) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(f"{leaf}_file", None)
        return data


def secret_files(
    settings_cls: type[BaseSettings], environ: Mapping[str, str]
) -> tuple[dict[str, Any], list[list[str]]]:
    """``PACS_TRIAGE_<SETTING>_FILE=path``: the setting's value read from a file (Docker/Kubernetes secrets).

    The file holds exactly what the environment variable would (a JSON list for token lists); one trailing
    newline is dropped. Only names that are a setting once ``_FILE`` is taken off count, and not when the
    whole name is a setting itself (``auth.tokens_file``, ``dicom.tls_cert_file`` are paths, read as such).
    Setting both the variable and its ``_FILE`` is refused: which one wins would be a guess. Returns the
    values (nested as the settings) and the setting paths read, e.g. ``[["auth", "admin_tokens"]]``.
    """
    prefix, suffix = PREFIX, SUFFIX
    found: dict[str, Any] = {}
    names: list[list[str]] = []
    upper = {k.upper(): v for k, v in environ.items()}
    for name, path in upper.items():
        if not (name.startswith(prefix) and name.endswith(suffix)) or _field(settings_cls, name, prefix):
            continue
        target = name[: -len(suffix)]
        field = _field(settings_cls, target, prefix)
        if field is None:
            continue
        if target in upper:
            raise ValueError(f"both {target} and {name} are set: keep one")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ValueError(f"{name}: cannot read {path}: {why}") from None
        text = text[:-1] if text.endswith("\n") else text
        *groups, leaf = target[len(prefix) :].lower().split("__")
        node = found
        for group in groups:
            node = node.setdefault(group, {})
        try:
            node[leaf] = _decode(field, text.removesuffix("\r"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name}: {path} must hold JSON, as {target} would: {exc.msg}") from None
        names.append([*groups, leaf])
    return found, names


def _field(settings_cls: type[BaseModel], env_name: str, prefix: str) -> FieldInfo | None:
    """The field ``PACS_TRIAGE_GROUP__NAME`` sets, if any (at most one group deep, as the settings are)."""
    parts = env_name[len(prefix) :].lower().split("__")
    model: type[BaseModel] = settings_cls
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return None
        if i == len(parts) - 1:
            return field
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return None


def _decode(field: FieldInfo, text: str) -> Any:
    """As pydantic-settings reads an environment variable: JSON for lists, dicts and groups, else the text."""
    origin = get_origin(field.annotation) or field.annotation
    if origin in (list, dict, set, tuple) or (isinstance(origin, type) and issubclass(origin, BaseModel)):
        return json.loads(text)
    return text
