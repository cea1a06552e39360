"""The base of every settings section: a typo in a YAML key or a variable name is an error, not ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["SettingsGroup"]


class SettingsGroup(BaseModel):
    """One section of :class:`service.config.Settings`; unknown fields are refused (``extra="forbid"``)."""

    model_config = ConfigDict(extra="forbid")
