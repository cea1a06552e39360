"""``pacs-triage models list | check | init``, and a model trained elsewhere served end to end after init."""

from __future__ import annotations

import json
import shutil
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from service.__main__ import main
from service.config import Settings
from service.inference.card import CARD_VERSION, ModelCard
from service.inference.postprocess import activate
from service.inference.preprocess import preprocess_dataset
from service.inference.registry import CARD_FILE
from tests.fixtures.foreign_model import expected_logits, write_foreign_classifier
from tests.fixtures.tiny_models import write_tiny_models
from tests.service.conftest import running_app
from tests.service.dicom_factory import chest

SHIPPED = Path(__file__).resolve().parents[2] / "models"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["models", *argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_check_every_shipped_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "check", str(SHIPPED))
    assert code == 0, out
    for name in ("ct-hemorrhage", "cxr-nodule", "cxr-pneumothorax"):
        assert f"{SHIPPED / name}: ok ({name} " in out and "ran a batch of 2 on CPU" in out


def test_check_names_each_problem_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_tiny_models(tmp_path)["cxr-pneumothorax"]
    card = json.loads((folder / CARD_FILE).read_text())
    card["opset"] = 19
    card["input"]["name"] = "pixels"
    card["reviewed_by"] = "someone"  # unknown field: kept, and pointed out
    (folder / CARD_FILE).write_text(json.dumps(card))
    code, out = run(capsys, "check", str(folder))
    assert code == 1
    assert f"{folder}: FAILED" in out
    assert "  - input.name is 'pixels'; the graph's input is 'image'\n" in out
    assert "  - opset is 19; the graph imports ai.onnx opset 17\n" in out
    card["opset"], card["input"]["name"] = 17, "image"
    (folder / CARD_FILE).write_text(json.dumps(card))
    code, out = run(capsys, "check", str(folder))
    assert code == 0, out
    assert "note: field 'reviewed_by' is not in the card schema; kept as is (a typo?)" in out


def test_check_runs_the_graph(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Declarations can agree while the graph cannot run: the test run finds it."""
    import onnx

    from service.inference.card import sha256_file

    folder = write_tiny_models(tmp_path)["cxr-pneumothorax"]
    model = onnx.load(str(folder / "model.onnx"))
    model.graph.node[-1].op_type = "NoSuchOperator"
    onnx.save(model, folder / "model.onnx")
    card = ModelCard.read(folder / CARD_FILE)
    path = folder / "model.onnx"
    card.model_copy(update={"sha256": sha256_file(path), "size_bytes": path.stat().st_size}).write(
        folder / CARD_FILE
    )
    code, out = run(capsys, "check", str(folder))
    assert code == 1 and "ONNX Runtime cannot run the model on 2 blank images" in out
    code, out = run(capsys, "check", "--no-run", str(folder))
    assert code == 0, out


def test_check_without_cards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "check", str(tmp_path))
    assert code == 1 and f"no card.json in {tmp_path}" in out


def test_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tiny_models(tmp_path)
    (tmp_path / "cxr-nodule" / "model.onnx").unlink()
    code, out = run(capsys, "list", "--models-dir", str(tmp_path))
    assert code == 1
    assert "cxr-pneumothorax\t0.0.1-test\tclassification\tcard v1\tok\n" in out
    assert "cxr-nodule\t-\t-\t-\tnot loaded: model file 'model.onnx' missing from cxr-nodule/\n" in out
    assert out.endswith(f"2 model(s) would load from {tmp_path}, 1 would not\n")


def test_list_defaults_to_the_models_dir_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tiny_models(tmp_path)
    monkeypatch.setenv("PACS_TRIAGE_MODELS_DIR", str(tmp_path))
    code, out = run(capsys, "list")
    assert code == 0, out
    assert out.endswith(f"3 model(s) would load from {tmp_path}, 0 would not\n")


def test_init_refuses_what_it_cannot_serve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_foreign_classifier(tmp_path / "in" / "m.onnx", channels=4)
    code, out = run(capsys, "init", str(source), "--name", "four", "--out", str(tmp_path / "models"))
    assert code == 1 and "has 4 channels; the service gives 1 or 3" in out
    code, out = run(capsys, "init", str(source), "--name", "Bad Name", "--out", str(tmp_path))
    assert code == 1 and "--name must be lower-case" in out
    (tmp_path / "junk.onnx").write_bytes(b"\x0f\x0f")
    code, out = run(capsys, "init", str(tmp_path / "junk.onnx"), "--name", "junk", "--out", str(tmp_path))
    assert code == 1 and "not an ONNX model" in out


def _fill(card: dict[str, Any]) -> None:
    """What the engineer writes into the draft: everything ``check`` listed as a placeholder."""
    card["description"] = "pneumothorax classifier trained elsewhere (2-class softmax)"
    card["intended_use"] = "demonstration model, not for clinical use"
    card["eligibility"] = {"modalities": ["CR", "DX"], "body_parts": ["CHEST"], "keywords": ["chest"]}
    card["labels"][0]["code"] = {"scheme": "SCT", "value": "36118008", "meaning": "Pneumothorax"}
    card["labels"][0]["threshold_rule"] = "fixed 0.5 for the test"
    card["training"] = {"source": "a public dataset, elsewhere"}
    card["license"] = "Apache-2.0"
    card["limitations"] = "adult chest radiographs only"


@pytest.mark.anyio
async def test_foreign_softmax_classifier_end_to_end(
    tmp_path: Path, tiny_models_dir: Path, capsys: pytest.CaptureFixture[str], make_settings: Any
) -> None:
    """An ONNX classifier from elsewhere (input 'input', 3 channels, 2-class logits): init, fill, check,
    and the running service routes a chest radiograph to it by its card alone and applies the softmax."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models)
    source = write_foreign_classifier(tmp_path / "elsewhere" / "classifier.onnx")
    code, out = run(
        capsys, "init", str(source), "--name", "cxr-foreign", "--out", str(models), "--labels", "pneumothorax"
    )
    assert code == 0, out
    folder = models / "cxr-foreign"
    assert "input input [None, 3, 32, 32], scores from logits (softmax)" in out
    assert (folder / "card.md").read_text().startswith("# cxr-foreign 0.1.0\n")
    card = json.loads((folder / CARD_FILE).read_text())
    assert card["card_version"] == CARD_VERSION and card["activation"] == "softmax"
    assert card["labels"][0]["index"] == 1 and card["preprocessing"]["channels"] == 3

    code, out = run(capsys, "check", str(folder))
    assert code == 1
    for field in ("description", "intended_use", "eligibility.modalities[0]", "labels[0].code.scheme"):
        assert f"  - {field} is a placeholder to fill" in out, out
    _fill(card)
    (folder / CARD_FILE).write_text(json.dumps(card))
    code, out = run(capsys, "check", str(folder))
    assert code == 0, out

    settings: Settings = make_settings(models_dir=models)
    body = chest()
    async with running_app(settings) as (_app, client):
        listed = (await client.get("/v1/models")).json()
        r = await client.post(
            "/v1/studies", content=body, headers={"Content-Type": "application/dicom", "Prefer": "wait=10"}
        )
    assert r.status_code == 200, r.text
    (entry,) = [m for m in listed["models"] if m["name"] == "cxr-foreign"]
    assert entry["card_version"] == 2 and entry["activation"] == "softmax"
    assert entry["documentation"] == {"license": "Apache-2.0", "limitations": "adult chest radiographs only"}
    (finding,) = [f for f in r.json()["findings"] if f["model"] == "cxr-foreign"]
    pre = preprocess_dataset(dcmread(BytesIO(body)), ModelCard(**card).preprocessing)
    assert pre.array.shape == (1, 3, 32, 32)
    expected = activate(expected_logits(pre.array), "softmax")[0, 1]
    assert finding["probability"] == pytest.approx(expected, abs=1e-5)
    assert 0.0 < finding["probability"] < 1.0 and finding["label"] == "pneumothorax"
    assert finding["positive"] == (expected >= 0.5)
    # the reproducibility record: what ran, on what, to get this number again
    (used,) = [m for m in r.json()["models"] if m["name"] == "cxr-foreign"]
    ds = dcmread(BytesIO(body))
    assert used == {
        "name": "cxr-foreign",
        "version": "0.1.0",
        "sha256": card["sha256"],
        "provider": "CPUExecutionProvider",
        "card_version": 2,
        "preprocessing_version": 2,
        "code_version": used["code_version"],
        "input_instances": [str(ds.SOPInstanceUID)],
    }
    assert used["code_version"].startswith("pacs-triage ")


def _bundle(root: Path, **changes: Any) -> Path:
    """A MONAI bundle as the MONAI Bundle Specification lays it out, with an ONNX export (made here)."""
    bundle = root / "chest_xray_classification"
    write_foreign_classifier(bundle / "models" / "model.onnx", channels=1, size=32)
    metadata: dict[str, Any] = {
        "schema": "https://example.invalid/meta_schema.json",
        "version": "0.4.2",
        "monai_version": "1.3.0",
        "pytorch_version": "2.1.0",
        "task": "Chest X-ray pneumothorax classification",
        "description": "A DenseNet121 trained on chest radiographs",
        "authors": "MONAI team",
        "data_source": "a public chest X-ray set",
        "data_type": "png",
        "intended_use": "research, not for clinical use",
        "references": ["Huang et al., Densely Connected Convolutional Networks, CVPR 2017"],
        "eval_metrics": {"auc": 0.91},
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "num_channels": 1,
                    "spatial_shape": [32, 32],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": 2,
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "no pneumothorax", "1": "pneumothorax"},
                }
            },
        },
    }
    for key, value in changes.items():
        metadata["network_data_format"]["inputs"]["image"][key] = value
    (bundle / "configs").mkdir(parents=True, exist_ok=True)
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (bundle / "LICENSE").write_text("\n   Apache License\n   Version 2.0, January 2004\n")
    return bundle


def test_monai_bundle_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = _bundle(tmp_path)
    models = tmp_path / "models"
    code, out = run(
        capsys, "init", "--monai-bundle", str(bundle), "--name", "cxr-monai", "--out", str(models)
    )
    assert code == 0, out
    assert (
        "not carried over: the bundle's pre-processing (configs/inference.json transforms) is not read" in out
    )
    card = ModelCard.read(models / "cxr-monai" / CARD_FILE)
    assert (card.version, card.authors, card.license) == (
        "0.4.2",
        ["MONAI team"],
        "Apache License (bundle LICENSE file)",
    )
    assert card.description.startswith("Chest X-ray pneumothorax classification - A DenseNet121")
    assert card.intended_use == "research, not for clinical use" and card.metrics == {"auc": 0.91}
    assert [(lb.name, lb.index) for lb in card.labels] == [("pneumothorax", 1)]  # from channel_def
    assert card.activation == "softmax"  # the graph ends in Gemm: logits, whatever the metadata says
    code, out = run(capsys, "check", str(models / "cxr-monai"))
    assert code == 1
    assert "  - training.preprocessing_check is a placeholder to fill" in out
    assert "  - eligibility.modalities[0] is a placeholder to fill" in out
    assert "  - description is a placeholder" not in out  # filled from metadata.json


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"spatial_shape": [96, 96, 96]}, "spatial shape [96, 96, 96]: the service feeds 2-D images"),
        ({"is_patch_data": True}, "patch data"),
        ({"num_channels": 3}, "metadata.json says 3 input channel(s); the ONNX graph takes 1"),
        ({"spatial_shape": [64, 64]}, "spatial_shape [64, 64] differs from the ONNX input 32 x 32"),
    ],
)
def test_monai_bundle_what_cannot_be_served(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, Any], needle: str
) -> None:
    bundle = _bundle(tmp_path, **changes)
    code, out = run(capsys, "init", "--monai-bundle", str(bundle), "--name", "m", "--out", str(tmp_path))
    assert code == 1 and needle in out, out


def test_monai_bundle_without_onnx_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = _bundle(tmp_path)
    (bundle / "models" / "model.onnx").unlink()
    code, out = run(capsys, "init", "--monai-bundle", str(bundle), "--name", "m", "--out", str(tmp_path))
    assert code == 1 and "export the bundle to ONNX first" in out


def test_init_reads_a_softmax_at_the_end_of_the_graph(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 2-class classifier whose graph ends in Softmax: its output is already probabilities."""
    source = write_foreign_classifier(tmp_path / "m.onnx", softmax=True)
    code, out = run(capsys, "init", str(source), "--name", "soft", "--out", str(tmp_path / "models"))
    assert code == 0, out
    card = ModelCard.read(tmp_path / "models" / "soft" / CARD_FILE)
    assert (card.activation, card.scores_name, card.label_columns()) == (
        "probabilities",
        "probabilities",
        [1],
    )
    code, out = run(capsys, "init", str(source), "--name", "soft", "--out", str(tmp_path / "models"))
    assert code == 1 and "exists (--force replaces it)" in out
    code, out = run(
        capsys,
        "init",
        str(source),
        "--name",
        "soft",
        "--out",
        str(tmp_path / "models"),
        "--force",
        "--activation",
        "sigmoid",
        "--labels",
        "normal,abnormal",
    )
    assert code == 0, out
    card = ModelCard.read(tmp_path / "models" / "soft" / CARD_FILE)
    assert card.activation == "sigmoid" and [(lb.name, lb.index) for lb in card.labels] == [
        ("normal", 0),
        ("abnormal", 1),
    ]


def test_a_refused_init_leaves_nothing_behind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_foreign_classifier(tmp_path / "m.onnx", channels=2)
    code, _ = run(capsys, "init", str(source), "--name", "two", "--out", str(tmp_path / "models"))
    assert code == 1 and not (tmp_path / "models").exists()
