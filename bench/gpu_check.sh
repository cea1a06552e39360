#!/usr/bin/env bash
# One call on a machine with an NVIDIA GPU: set up, prove the CUDA execution provider really runs the models
# (not a silent CPU fallback), then print bench_engine and bench_rest ratios on the GPU.
#
# Usage (from the repository root):  bash bench/gpu_check.sh [--quick]
#   --quick   fewer rounds (fits a short device lease)
# Needs: python3 >= 3.11, CUDA 13 + cuDNN 9 for onnxruntime-gpu 1.31 (docs: PEERS.md), the repository's
# models/ directory. Uses .venv if it exists, else creates one and installs the service with pip.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=30; STUDIES=96; ENGINE_ROUNDS=100
if [[ "${1:-}" == "--quick" ]]; then ROUNDS=10; STUDIES=48; ENGINE_ROUNDS=30; fi

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || { echo "no NVIDIA GPU visible"; exit 2; }
nproc

echo "== environment"
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
