"""Explanations of the shipped classifiers: a class-activation map output in the ONNX graph, and t-SNE.

``python -m training explain`` (and ``ship``, after the domain step) runs :func:`explain_model` on each
classifier folder, from its training checkpoint and without retraining:

1. :func:`add_cam_output`: the graph gets an output ``cam`` ``[N, labels, h, w]`` at the resolution of the
   last backbone feature map ``A`` (``h x w``), ``cam_c = ReLU(sum_k w_ck A_k)`` with ``w`` the final linear
   layer's weights. This is the class-activation map of Zhou et al. 2016 ("Learning Deep Features for
   Discriminative Localization", CVPR), and for a head that is global average pooling followed by a linear
   layer it is also Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
   Gradient-based Localization", ICCV): the gradient of the logit ``y_c = sum_k w_ck mean(A_k) + b_c``
   with respect to each cell of ``A_k`` is ``w_ck / (h w)``, so Grad-CAM's channel weights are the linear
   weights divided by ``h w`` and Grad-CAM equals ``cam / (h w)``. No gradients are needed at serve time,
   so ONNX Runtime computes it in the same run as the probability (a 1x1 convolution on an ``h x w`` map),
   and the service needs no torch. Only nodes are added: every output of the shipped file (but a ``cam``
   being rebuilt) is checked bit-identical on held-out images against that file before the new one
   replaces it (:func:`training.domain.check_outputs_unchanged`);
   the ``embedding`` output the domain gate reads is added as well if it is missing.
2. the parity check (torch vs ONNX Runtime, :data:`training.export.PARITY_TOLERANCE`) is rerun for every
   output, the torch side computed from the checkpoint's model (:func:`torch_outputs`), so a checkpoint that
   is not the one the graph was exported from fails loudly;
3. :func:`training.tsne.plot_tsne` maps the held-out set's ``embedding`` to 2-D (van der Maaten & Hinton
   2008), coloured by label, into ``tsne.png`` beside the model, linked from ``card.md``;
4. the card gets ``cam_output``, the new ``outputs``, sha256, size, parity and ``explanations``.

The detector (``cxr-nodule``) is left alone: its boxes already say where.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.inference.card import ModelCard, sha256_file
from training.dataset import PreprocessedSet
from training.domain import EMBEDDING_OUTPUT, add_embedding_output, check_outputs_unchanged
from training.export import PARITY_INPUTS, ParityError, ort_predict, ort_session, parity_report

__all__ = [
    "CAM_OUTPUT",
    "CLASSIFIER_TASKS",
    "add_cam_output",
    "check_parity_all",
    "explain_model",
    "grad_cam",
    "remove_cam_output",
    "torch_outputs",
]

log = logging.getLogger(__name__)

CAM_OUTPUT = "cam"
CLASSIFIER_TASKS = ("classification", "series_classification")
TSNE_PLOT = "tsne.png"
_POOL_OPS = ("ReduceMean", "GlobalAveragePool")
_FLATTEN_OPS = ("Reshape", "Flatten")


def add_cam_output(
    src: Path, dst: Path, aux: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[int, int, int]:
    """Write ``src`` with an extra ``cam`` output to ``dst``; returns ``(labels, h, w)`` of the map.

    The graph is followed back from the classifier head (a ``Gemm`` reading ``head.weight``): its input is
    a flattened global average of the feature map the map is computed on. Anything else raises ValueError.
    ``aux`` (weight ``[1, C, 1, 1]``, bias ``[1]``: a deeply supervised classifier's ``aux`` head, which
    training taught where the finding is) makes the map ``Sigmoid(aux(A))`` instead of the CAM: see
    :func:`explain_model`.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    if any(o.name == CAM_OUTPUT for o in graph.output):
        raise ValueError(f"{src} already has an output {CAM_OUTPUT!r}")
    producer = {out: node for node in graph.node for out in node.output}
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    heads = [n for n in graph.node if n.op_type == "Gemm" and "head.weight" in n.input]
    if not heads:
        raise ValueError(f"{src}: no classifier head (a Gemm reading head.weight) to build a CAM from")
    head = heads[0]
    flat = producer.get(head.input[0])
    pool = producer.get(flat.input[0]) if flat is not None and flat.op_type in _FLATTEN_OPS else None
    if pool is None or pool.op_type not in _POOL_OPS:
        raise ValueError(f"{src}: the head does not read a global average of a feature map")
    if pool.op_type == "ReduceMean" and len(pool.input) > 1:
        axes = sorted(int(a) % 4 for a in weights[pool.input[1]].ravel())
        if axes != [2, 3]:
            raise ValueError(f"{src}: the head's ReduceMean averages axes {axes}, not the spatial [2, 3]")
    feature = pool.input[0]
    trans_b = next((a.i for a in head.attribute if a.name == "transB"), 0)
    weight = weights["head.weight"] if trans_b else weights["head.weight"].T  # [labels, channels]
    labels, channels = weight.shape
    if aux is None:
        graph.initializer.append(
            numpy_helper.from_array(weight.reshape(labels, channels, 1, 1).astype(np.float32), "cam.weight")
        )
        graph.node.append(helper.make_node("Conv", [feature, "cam.weight"], ["cam_sum"], name="cam_conv"))
        graph.node.append(helper.make_node("Relu", ["cam_sum"], [CAM_OUTPUT], name="cam_relu"))
    else:
        aux_weight, aux_bias = (np.asarray(a, dtype=np.float32) for a in aux)
        if aux_weight.shape != (labels, channels, 1, 1) or aux_bias.shape != (labels,):
            raise ValueError(f"{src}: aux head {aux_weight.shape}/{aux_bias.shape} does not fit the features")
        graph.initializer.append(numpy_helper.from_array(aux_weight, "cam.weight"))
        graph.initializer.append(numpy_helper.from_array(aux_bias, "cam.bias"))
        inputs = [feature, "cam.weight", "cam.bias"]
        graph.node.append(helper.make_node("Conv", inputs, ["cam_sum"], name="cam_conv"))
        graph.node.append(helper.make_node("Sigmoid", ["cam_sum"], [CAM_OUTPUT], name="cam_sigmoid"))
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: v.type.tensor_type.shape.dim for v in inferred.graph.value_info}
    dims = shapes.get(feature)
    h, w = (int(dims[2].dim_value), int(dims[3].dim_value)) if dims and len(dims) == 4 else (0, 0)
    batch = graph.output[0].type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_param or (batch.dim_value if batch.dim_value else "batch")
    graph.output.append(
        helper.make_tensor_value_info(
            CAM_OUTPUT, TensorProto.FLOAT, [batch_dim, labels, h or "cam_h", w or "cam_w"]
        )
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return int(labels), h, w


def _classifier_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Linear]:
    backbone, pool, head = (getattr(model, a, None) for a in ("backbone", "pool", "head"))
    if backbone is None or pool is None or not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} is not a backbone + pool + linear head classifier")
    return backbone, pool, head


def torch_outputs(model: nn.Module) -> Any:
    """A function ``x -> {output name: tensor}`` computing every output of the explained graph in torch."""
    backbone, pool, head = _classifier_parts(model)

    @torch.no_grad()
    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = backbone(x)
        pooled = pool(feats).flatten(1)
        aux = getattr(model, "aux", None)
        if isinstance(aux, nn.Conv2d):
            cam = torch.sigmoid(aux(feats))
        else:
            cam = torch.relu(torch.einsum("lc,nchw->nlhw", head.weight, feats))
        return {"probability": torch.sigmoid(head(pooled)), EMBEDDING_OUTPUT: pooled, CAM_OUTPUT: cam}

    return run


def grad_cam(model: nn.Module, x: torch.Tensor, label: int = 0) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) of ``label``'s logit on the last feature map, with autograd.

    ``ReLU(sum_k alpha_k A_k)`` with ``alpha_k`` the spatial mean of ``d logit / d A_k``; returns
    ``[N, h, w]``. The reference the ONNX ``cam`` output is tested against (``cam / (h w)``).
    """
    backbone, pool, head = _classifier_parts(model)
    model.eval()
    feats = backbone(x).detach().requires_grad_(True)
    logits = head(pool(feats).flatten(1))[:, label]
    (grads,) = torch.autograd.grad(logits.sum(), feats)  # samples are independent: one backward for all
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    return torch.relu((alpha * feats).sum(dim=1)).detach()


def check_parity_all(model: nn.Module, onnx_path: Path, inputs: np.ndarray) -> dict[str, Any]:
    """Max absolute difference of every graph output, torch vs ONNX Runtime; raises ParityError."""
    model.eval()
    inputs = np.ascontiguousarray(inputs[:PARITY_INPUTS], dtype=np.float32)
    ort_out = ort_predict(ort_session(onnx_path), inputs, batch_size=8)
    expected = torch_outputs(model)(torch.from_numpy(inputs))
    missing = sorted(set(ort_out) - set(expected))
    if missing:
        raise ParityError(f"no torch reference for output(s) {missing}")
    diffs = {k: float(np.max(np.abs(v - expected[k].numpy()))) for k, v in ort_out.items()}
    return parity_report(diffs, len(inputs))


def remove_cam_output(src: Path, dst: Path) -> None:
    """``src`` without the ``cam`` output and the nodes and weights :func:`add_cam_output` added."""
    import onnx

    model = onnx.load(str(src))
    graph = model.graph
    nodes = [n for n in graph.node if n.name not in ("cam_conv", "cam_relu", "cam_sigmoid")]
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [i for i in graph.initializer if i.name not in ("cam.weight", "cam.bias")]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    outputs = [o for o in graph.output if o.name != CAM_OUTPUT]
    del graph.output[:]
    graph.output.extend(outputs)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


AUX_METHOD = (
    "Sigmoid(a . A + b) on the last backbone feature map A, (a, b) the deep-supervision head that training "
    "taught where the finding is (the per-pixel mask max-pooled to A's cells, training.train._loss): the "
    "probability that each cell holds the finding, read from the same features as the series score. It is "
    "not the class-activation map of the score's linear head: on this model that map peaked inside the "
    "bleed on 7 of 18 fresh positive series, this one on 76 % of fresh slices with blood (session 7)"
)
CAM_METHOD = (
    "ReLU(sum_k w_k A_k) on the last backbone feature map A, w the final linear layer's weights: "
    "the class-activation map (Zhou et al. 2016), equal to Grad-CAM (Selvaraju et al. 2017) "
    "times h*w for a global-average-pooled linear head; computed by ONNX Runtime in the same run"
)


def explain_model(model_dir: Path, checkpoint: Path, held_out: PreprocessedSet) -> ModelCard:
    """Add ``cam`` (and ``embedding`` if missing) to ``model_dir``'s classifier, check it, plot t-SNE.

    A deeply supervised classifier (its checkpoint has an ``aux`` head) gets the map of that head, which
    was taught where the finding is, rather than the class-activation map (:data:`AUX_METHOD`); a graph
    whose ``cam`` was built the other way is rebuilt.

    ``checkpoint`` is the training checkpoint the graph was exported from (``var/runs/<name>/best.pt``);
    ``held_out`` images never seen in training, preprocessed with the card's spec. Rewrites model.onnx,
    card.json, card.md and tsne.png; returns the new card.
    """
    from training.export import write_card_md
    from training.train import load_checkpoint
    from training.tsne import plot_tsne

    card = ModelCard.read(model_dir / "card.json")
    if card.task not in CLASSIFIER_TASKS:
        raise ValueError(f"{card.name}: task {card.task} gets no class-activation map")
    model, _ = load_checkpoint(checkpoint)
    aux_head = getattr(model, "aux", None)
    aux = None
    if isinstance(aux_head, nn.Conv2d) and aux_head.bias is not None:
        aux = (aux_head.weight.detach().numpy(), aux_head.bias.detach().numpy())
    method = AUX_METHOD if aux is not None else CAM_METHOD
    onnx_path = model_dir / card.file
    outputs = list(card.outputs)
    with tempfile.TemporaryDirectory() as tmp:
        current = onnx_path
        if EMBEDDING_OUTPUT not in outputs:
            current = Path(tmp) / "with_embedding.onnx"
            add_embedding_output(onnx_path, current)
            outputs.append(EMBEDDING_OUTPUT)
        built = ((card.explanations or {}).get("cam") or {}).get("method")
        rebuilt: set[str] = set()  # outputs of the shipped file that are replaced on purpose
        if CAM_OUTPUT in outputs and built != method:
            rebuilt.add(CAM_OUTPUT)
            stripped = Path(tmp) / "without_cam.onnx"
            remove_cam_output(current, stripped)
            current = stripped
            outputs.remove(CAM_OUTPUT)
        candidate = Path(tmp) / card.file
        if CAM_OUTPUT in outputs:
            shutil.copy2(current, candidate)
            cam_shape = None
        else:
            cam_shape = add_cam_output(current, candidate, aux)
            outputs.append(CAM_OUTPUT)
        # against the file being replaced, not ``current``: a step in between (the embedding added, the old
        # cam removed) that changed an output would otherwise be invisible to the check
        check_outputs_unchanged(onnx_path, candidate, held_out.images[:64], except_outputs=rebuilt)
        parity = check_parity_all(model, candidate, held_out.images)
        embedding = ort_predict(ort_session(candidate), held_out.images)[EMBEDDING_OUTPUT]
        tsne = plot_tsne(embedding, held_out.labels, model_dir / TSNE_PLOT, card.name, card.labels[0].name)
        shutil.copy2(candidate, onnx_path)
    previous = card.explanations or {}
    hw = list(cam_shape[1:]) if cam_shape else previous.get("cam", {}).get("shape", ["N", 0, "h", "w"])[2:]
    explanations = {
        "cam": {
            "output": CAM_OUTPUT,
            "shape": ["N", len(card.labels), *hw],
            "method": method,
            "old_outputs_bit_identical": True,
        },
        "tsne": tsne,
    }
    final = ModelCard.model_validate(
        {
            **card.model_dump(mode="json"),
            "outputs": outputs,
            "cam_output": CAM_OUTPUT,
            "parity": parity,
            "explanations": explanations,
            "sha256": sha256_file(onnx_path),
            "size_bytes": onnx_path.stat().st_size,
        }
    )
    final.write(model_dir / "card.json")
    write_card_md(final, model_dir, sorted(model_dir.glob("*.png")))
    log.info("%s explained: parity %s, t-SNE %s", card.name, parity["per_output"], tsne)
    return final


def explain_all(
    models_dir: Path, runs_dir: Path, data_dir: Path, names: list[str] | None = None
) -> dict[str, Any]:
    """:func:`explain_model` for every shipped classifier (or ``names``) from ``runs_dir/<name>/best.pt``.

    The held-out images are the domain step's fresh generator set (:mod:`training.domain_data`, seeds no
    training run used), generated under ``data_dir`` unless it already holds them.
    """
    from training.dataset import preprocess_records
    from training.domain_data import CT_MODELS, CXR_MODELS, SEEDS, SIZES, generated

    reports: dict[str, Any] = {}
    for kind, models in (("cxr", CXR_MODELS), ("ct", CT_MODELS)):
        for name in models:
            if names is not None and name not in names:
                continue
            card = ModelCard.read(models_dir / name / "card.json")
            if card.task not in CLASSIFIER_TASKS:
                log.info("%s: %s, no class-activation map (its boxes say where)", name, card.task)
                continue
            checkpoint = runs_dir / name / "best.pt"
            if not checkpoint.exists():
                raise FileNotFoundError(f"{name}: no checkpoint {checkpoint} to check the graph against")
            records = generated(kind, "held_out", data_dir, SIZES[kind]["held_out"])
            held_out = preprocess_records(records, card.preprocessing, card.labels[0].name, progress=False)
            final = explain_model(models_dir / name, checkpoint, held_out)
            reports[name] = {"seeds": SEEDS[kind]["held_out"], **(final.explanations or {})}
    return reports
