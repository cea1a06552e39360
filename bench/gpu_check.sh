#!/usr/bin/env bash
# One call on a machine with an NVIDIA GPU: set up, prove the CUDA execution provider really runs the models
# (not a silent CPU fallback) and gives the CPU's answers, then print bench_engine and bench_rest ratios on
# the GPU, and time a training step and a short training run on the GPU (training/, torch's autocast).
#
# Usage (from the repository root):  bash bench/gpu_check.sh [--quick] [--wheels DIR]
#   --quick        fewer rounds (fits a short device lease)
#   --wheels DIR   a machine without a package index (an air-gapped GPU server): install the service's
#                  dependencies and onnxruntime-gpu from the wheels in DIR into a folder of their own, and use
#                  the machine's python3 and its NVIDIA CUDA/cuDNN wheels (a PyTorch CUDA image has them)
# Needs: python3 >= 3.11, CUDA 13 + cuDNN 9 for onnxruntime-gpu 1.31 (docs: PEERS.md), the repository's
# models/ directory. Without --wheels: uses .venv if it exists, else creates one and installs with pip.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=30; STUDIES=96; ENGINE_ROUNDS=100; EPOCHS=3; WHEELS=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) ROUNDS=10; STUDIES=48; ENGINE_ROUNDS=30; EPOCHS=2; shift ;;
        --wheels) WHEELS="$2"; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || { echo "no NVIDIA GPU visible"; exit 2; }
nproc

echo "== environment"
if [[ -n "$WHEELS" ]]; then
    SITE="${TMPDIR:-/tmp}/pacs-triage-gpu-site"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
    PY=python3
    export PYTHONPATH="$SITE:$PWD"
    # CUDA and cuDNN from the machine's nvidia-* wheels: onnxruntime.preload_dlls looks for them only beside
    # the onnxruntime package, which lives in $SITE here, so put their folders on the loader's path.
    NVLIBS=$($PY -c "import glob, os, site; print(':'.join(sorted({os.path.dirname(p) for d in site.getsitepackages() for p in glob.glob(d + '/nvidia/**/lib/lib*.so*', recursive=True)})))")
    export LD_LIBRARY_PATH="$NVLIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
    if [[ ! -x .venv/bin/python ]]; then
        python3 -m venv .venv
        .venv/bin/pip install -q -e . httpx
    fi
    PY=.venv/bin/python
    # The GPU build of ONNX Runtime (the gpu extra) replaces the CPU one: both install the module onnxruntime,
    # so the CPU wheel goes first (as scripts/bootstrap gpu does); only when CUDA is not offered yet.
    if ! $PY -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
        .venv/bin/pip uninstall -q -y onnxruntime || true
        .venv/bin/pip install -q -e ".[gpu]"
    fi
fi
$PY -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"

echo "== CUDA provider really used"
# get_available_providers() lists CUDA even without CUDA libraries (PEERS.md): decide from the session.
$PY - <<'PYEOF'
import sys, time
from pathlib import Path
import numpy as np
import onnxruntime as ort
from service.inference.registry import ModelRegistry

registry = ModelRegistry.from_directory(Path("models"))
bad = []
for name, model in sorted(registry.models.items()):
    session = ort.InferenceSession(
        str(model.onnx_path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    used = session.get_providers()
    shape = [1 if d is None or isinstance(d, str) else d for d in model.card.input.shape]
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    session.run(None, {model.card.input.name: x})  # warm-up (CUDA kernels, memory arena)
    t0 = time.perf_counter()
    for _ in range(20):
        session.run(None, {model.card.input.name: x})
    ms = (time.perf_counter() - t0) / 20 * 1000
    print(f"{name}: providers {used}, {ms:.2f} ms per run")
    if used[0] != "CUDAExecutionProvider":
        bad.append(name)
if bad:
    sys.exit(f"CUDA execution provider NOT used for {bad}: silent CPU fallback (check CUDA 13 / cuDNN 9)")
print("CUDA execution provider in use for every model")
PYEOF

echo "== CUDA answers as the CPU does (each model, a real preprocessed image)"
$PY - <<'PYEOF'
import sys, tempfile
from pathlib import Path
import numpy as np
import onnxruntime as ort
import pydicom
from service.inference.preprocess import preprocess_dataset
from service.inference.registry import ModelRegistry
from training.data.synthetic import generate_ct, generate_cxr

registry = ModelRegistry.from_directory(Path("models"))
worst = 0.0
with tempfile.TemporaryDirectory() as tmp:
    files = {
        "CR": sorted(generate_cxr(Path(tmp) / "cxr", n_patients=4, seed=11).parent.rglob("*.dcm")),
        "CT": sorted(generate_ct(Path(tmp) / "ct", n_patients=1, seed=12).parent.rglob("*.dcm"))[:8],
    }
    for name, model in sorted(registry.models.items()):
        card = model.card
        paths = files["CT" if "CT" in card.eligibility.modalities else "CR"]
        x = np.concatenate([preprocess_dataset(pydicom.dcmread(p), card.preprocessing).array for p in paths])
        out = {}
        for ep in ("CUDAExecutionProvider", "CPUExecutionProvider"):
            s = ort.InferenceSession(str(model.onnx_path), providers=[ep])
            out[ep] = s.run(None, {card.input.name: x.astype(np.float32)})
        diffs = [float(np.max(np.abs(a - b))) for a, b in zip(*out.values())]
        scale = max(float(np.max(np.abs(b))) for b in out["CPUExecutionProvider"])
        worst = max(worst, max(diffs) / max(scale, 1e-6))
        print(f"{name}: {len(x)} images, max |CUDA - CPU| per output {[f'{d:.2e}' for d in diffs]} (output scale {scale:.3g})")
print(f"worst relative difference {worst:.2e}")
if worst > 1e-2:
    sys.exit("CUDA and CPU outputs differ by more than 1% of the output scale")
PYEOF

echo "== service engine on CUDA (what /v1/models reports)"
$PY - <<'PYEOF'
import asyncio, sys
from pathlib import Path
from service.config import InferenceSettings
from service.inference.registry import ModelRegistry
from service.inference.router import EngineRouter

async def main() -> None:
    registry = ModelRegistry.from_directory(Path("models"))
    engine = EngineRouter.from_settings(registry, InferenceSettings(providers="cuda"))
    await engine.start()
    try:
        used = {name: engine.providers_for(name) for name in engine.model_names}
        print(used)
        if any(not p or p[0] != "CUDAExecutionProvider" for p in used.values()):
            sys.exit("the service engine fell back to CPU")
    finally:
        await engine.stop()

asyncio.run(main())
PYEOF

echo "== bench_engine (engine vs bare ORT, CUDA)"
$PY bench/bench_engine.py models --providers cuda --rounds "$ENGINE_ROUNDS"

echo "== bench_rest (REST vs decode + preprocess + ORT, CUDA)"
$PY bench/bench_rest.py --providers cuda --rounds "$ROUNDS" --studies "$STUDIES"

echo "== training on the GPU (torch $($PY -c 'import torch; print(torch.__version__)'))"
$PY bench/bench_training.py --device cuda --steps 20
WORK="${TMPDIR:-/tmp}/pacs-triage-gpu-train"
rm -rf "$WORK"
$PY -m training synth --out "$WORK" --cxr-patients 200 --ct-patients 0 --workers "$(nproc)"
$PY -m training train --plan cxr-pneumothorax --data "$WORK/cxr" --out "$WORK/run" --epochs "$EPOCHS"
