"""ModelRegistry: loads good cards, records each bad model with a reason and keeps the others."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from service.inference.registry import ModelRegistry
from tests.fixtures.tiny_models import TINY_MODELS, write_tiny_models


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    write_tiny_models(tmp_path)
    return tmp_path


class TestModelRegistry:
    def test_loads_tiny_models(self, models_dir: Path) -> None:
        registry = ModelRegistry.from_directory(models_dir)
        assert set(registry.models) == set(TINY_MODELS)
        assert registry.errors == {}
        model = registry.models["cxr-nodule"]
        assert model.card.task == "detection"
        assert model.onnx_path == models_dir / "cxr-nodule" / "model.onnx"
        assert "cxr-nodule" in registry and len(registry) == 3

    def test_sha_mismatch_only_that_model_fails(
        self, models_dir: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        onnx_path = models_dir / "cxr-pneumothorax" / "model.onnx"
        data = bytearray(onnx_path.read_bytes())
        data[-1] ^= 0xFF  # same size, different content
        onnx_path.write_bytes(bytes(data))
        with caplog.at_level(logging.ERROR, logger="service.inference.registry"):
            registry = ModelRegistry.from_directory(models_dir)
        assert set(registry.models) == {"cxr-nodule", "ct-hemorrhage"}
        assert "sha256 mismatch" in registry.errors["cxr-pneumothorax"]
        assert any("cxr-pneumothorax" in r.getMessage() for r in caplog.records)

    def test_truncated_file_reports_size(self, models_dir: Path) -> None:
        onnx_path = models_dir / "ct-hemorrhage" / "model.onnx"
        onnx_path.write_bytes(onnx_path.read_bytes()[:10])
        registry = ModelRegistry.from_directory(models_dir)
        assert "bytes" in registry.errors["ct-hemorrhage"]
        assert len(registry.models) == 2

    def test_missing_file(self, models_dir: Path) -> None:
        (models_dir / "cxr-nodule" / "model.onnx").unlink()
        registry = ModelRegistry.from_directory(models_dir)
        assert "missing" in registry.errors["cxr-nodule"]
        assert len(registry.models) == 2

    def test_invalid_card(self, models_dir: Path) -> None:
        card_path = models_dir / "cxr-nodule" / "card.json"
        card = json.loads(card_path.read_text())
        card["opset"] = 11
        del card["labels"]
        card_path.write_text(json.dumps(card))
        registry = ModelRegistry.from_directory(models_dir)
        message = registry.errors["cxr-nodule"]
        assert message.startswith("invalid card.json") and "opset" in message and "labels" in message
        assert len(registry.models) == 2

    def test_card_not_json(self, models_dir: Path) -> None:
        (models_dir / "cxr-nodule" / "card.json").write_text("{not json")
        registry = ModelRegistry.from_directory(models_dir)
        assert "invalid card.json" in registry.errors["cxr-nodule"]

    def test_name_must_match_folder(self, models_dir: Path) -> None:
        (models_dir / "cxr-nodule").rename(models_dir / "other")
        registry = ModelRegistry.from_directory(models_dir)
        assert "does not match its folder" in registry.errors["other"]

    def test_missing_directory(self, tmp_path: Path) -> None:
        registry = ModelRegistry.from_directory(tmp_path / "nowhere")
        assert registry.models == {}
        assert "does not exist" in registry.errors["*"]

    def test_mark_failed_moves_model(self, models_dir: Path) -> None:
        registry = ModelRegistry.from_directory(models_dir)
        registry.mark_failed("cxr-nodule", "session failed")
        assert "cxr-nodule" not in registry.models
        assert registry.errors == {"cxr-nodule": "session failed"}
