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
    # "<VARIABLE>_FILE" names a secret file for a setting (service/config/secret_files.py), not a setting
    documented = {n for n in documented if not (n.endswith("_FILE") and n.removesuffix("_FILE") in expected)}
    assert expected <= documented, sorted(expected - documented)
    assert documented <= expected, sorted(documented - expected)


class TestSecretFiles:
    """``PACS_TRIAGE_<SETTING>_FILE``: a setting read from a file, as Docker and Kubernetes mount secrets."""

    def test_values_come_from_the_files(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        tokens = tmp_path / "admin_tokens"
        tokens.write_text('["first-admin-token-0123456789", "second-admin-token-0123456789"]\n')
        secret = tmp_path / "webhook_secret"
        secret.write_text("hmac-key-from-a-secret\n")
        url = tmp_path / "database_url"
        url.write_text("postgresql+psycopg://triage:pw@db:5432/triage")
        monkeypatch.setenv("PACS_TRIAGE_AUTH__ADMIN_TOKENS_FILE", str(tokens))
        monkeypatch.setenv("PACS_TRIAGE_NOTIFY__WEBHOOK_SECRET_FILE", str(secret))
        monkeypatch.setenv("PACS_TRIAGE_STORE__DATABASE_URL_FILE", str(url))
        s = Settings()
        assert [t.get_secret_value() for t in s.auth.admin_tokens] == [
            "first-admin-token-0123456789",
            "second-admin-token-0123456789",
        ]
        assert s.notify.webhook_secret is not None
        assert s.notify.webhook_secret.get_secret_value() == "hmac-key-from-a-secret"  # newline dropped
        assert s.database_url == "postgresql+psycopg://triage:pw@db:5432/triage"

    def test_settings_that_are_paths_stay_paths(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("PACS_TRIAGE_AUTH__TOKENS_FILE", str(tmp_path / "tokens"))
        monkeypatch.setenv("PACS_TRIAGE_DICOM__TLS_CERT_FILE", str(tmp_path / "cert.pem"))
        s = Settings()
        assert s.auth.tokens_file == tmp_path / "tokens"  # not read: the file need not even exist here
        assert s.dicom.tls_cert_file == tmp_path / "cert.pem"

    def test_file_beats_yaml(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        cfg = tmp_path / "triage.yaml"
        cfg.write_text("notify:\n  webhook_secret: from-yaml\n")
        secret = tmp_path / "secret"
        secret.write_text("from-file")
        monkeypatch.setenv("PACS_TRIAGE_CONFIG", str(cfg))
        monkeypatch.setenv("PACS_TRIAGE_NOTIFY__WEBHOOK_SECRET_FILE", str(secret))
        webhook_secret = Settings().notify.webhook_secret
        assert webhook_secret is not None and webhook_secret.get_secret_value() == "from-file"

    def test_both_variable_and_file_refused(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        secret = tmp_path / "secret"
        secret.write_text("x")
        monkeypatch.setenv("PACS_TRIAGE_NOTIFY__WEBHOOK_SECRET", "y")
        monkeypatch.setenv("PACS_TRIAGE_NOTIFY__WEBHOOK_SECRET_FILE", str(secret))
        with pytest.raises(ValueError, match="both PACS_TRIAGE_NOTIFY__WEBHOOK_SECRET and"):
            Settings()

    def test_unreadable_or_malformed_file_named(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("PACS_TRIAGE_NOTIFY__WEBHOOK_SECRET_FILE", str(tmp_path / "missing"))
        with pytest.raises(ValueError, match="PACS_TRIAGE_NOTIFY__WEBHOOK_SECRET_FILE: cannot read"):
            Settings()
        monkeypatch.delenv("PACS_TRIAGE_NOTIFY__WEBHOOK_SECRET_FILE")
        tokens = tmp_path / "tokens"
        tokens.write_text("one-token-not-json")
        monkeypatch.setenv("PACS_TRIAGE_AUTH__READER_TOKENS_FILE", str(tokens))
        with pytest.raises(ValueError, match="must hold JSON"):
            Settings()
