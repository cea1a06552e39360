"""Settings: env nesting, YAML file, precedence, validation, and the README table covering every field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from service.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def _env_names(model: type[BaseModel], prefix: str = "PACS_TRIAGE_") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            names += _env_names(ann, f"{prefix}{name.upper()}__")
        else:
            names.append(prefix + name.upper())
    return names


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PACS_TRIAGE_CONFIG", raising=False)
    s = Settings()
    assert s.models_dir == Path("models") and s.data_dir == Path("var")
    assert (s.inference.max_batch, s.inference.max_wait_ms, s.inference.providers) == (8, 2.0, "auto")
    assert (s.api.host, s.api.port) == ("127.0.0.1", 8000)
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith("var/pacs-triage.db")
    assert s.routing_rules_path.name == "routing_rules.yaml" and s.routing_rules_path.exists()


def test_env_nested_and_yaml_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "triage.yaml"
    cfg.write_text(
        "data_dir: /srv/triage\ninference:\n  max_batch: 4\n  max_wait_ms: 7\napi:\n  port: 9000\n"
    )
    monkeypatch.setenv("PACS_TRIAGE_CONFIG", str(cfg))
    monkeypatch.setenv("PACS_TRIAGE_INFERENCE__MAX_BATCH", "16")
    s = Settings()
    assert s.inference.max_batch == 16  # env beats YAML
    assert s.inference.max_wait_ms == 7  # YAML beats default
    assert s.api.port == 9000 and s.data_dir == Path("/srv/triage")
    assert Settings(inference={"max_batch": 2}).inference.max_batch == 2  # arguments beat env


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("PACS_TRIAGE_INFERENCE__PROVIDERS", "tpu"),
        ("PACS_TRIAGE_API__PORT", "70000"),
        ("PACS_TRIAGE_LOG_LEVEL", "x"),
    ],
)
def test_bad_values_refused(monkeypatch: pytest.MonkeyPatch, env: str, value: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError):
        Settings()


def test_readme_documents_every_setting() -> None:
    text = README.read_text(encoding="utf-8")
    table = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(PACS_TRIAGE_[A-Z0-9_]+)`", table))
    expected = set(_env_names(Settings)) | {"PACS_TRIAGE_CONFIG"}
    assert expected <= documented, sorted(expected - documented)
    assert documented <= expected, sorted(documented - expected)
