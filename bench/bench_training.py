"""Training step cost of the shipped architectures, float32 against the mixed precision training now uses.

Why: the 60-minute CPU budget of ``scripts/retrain-models`` (issue 14) decides how many epochs and how much
data each shipped model gets, so the cost of one optimiser step is what to measure. Each architecture is
timed side by side in this process, the same seeded weights and batch, in both modes:

- ``float32``: what training did before session 10;
- ``mixed``: what ``training.train`` does now where ``autocast_dtype`` allows it (bfloat16 autocast,
  channels-last activations); on a CPU without native bfloat16 it reports that and times float32 twice.

The ratio is float32's time over mixed's (higher is better). The loss functions are the training loop's own
(``training.train._loss``), so the deep supervision of the CT classifier and CenterNet's loss are included.

Usage::

    PYTHONPATH=$PWD .venv/bin/python bench/bench_training.py [--steps 10] [--threads 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from training.models.detector import STRIDE
from training.train import TrainConfig, _autocast, _loss, autocast_dtype, build_model

CASES = {
    # name: (task, input size, deep-supervision weight): the three shipped plans' shapes
    "cxr-pneumothorax (classifier, 128 px)": ("classification", 128, 0.0),
    "ct-hemorrhage (classifier + mask supervision, 128 px)": ("classification", 128, 1.0),
    "cxr-nodule (CenterNet, 256 px)": ("detection", 256, 0.0),
}


def batch_for(task: str, size: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    image = torch.randn(n, 1, size, size, generator=g)
    if task == "classification":
        return {
            "image": image,
            "label": torch.randint(0, 2, (n, 1), generator=g).float(),
            "where": (torch.rand(n, 1, size, size, generator=g) > 0.95).float(),
        }
    cells = size // STRIDE
    return {
        "image": image,
        "heatmap": torch.rand(n, 1, cells, cells, generator=g) * 0.5,
        "mask": torch.zeros(n, 1, cells, cells),
        "size": torch.zeros(n, 2, cells, cells),
    }


def step_ms(
    task: str, size: int, aux: float, mixed: bool, steps: int, batch_size: int, device: torch.device
) -> float:
    """Mean wall time of one forward + backward + AdamW step, after three warm-up steps."""
    torch.manual_seed(0)
    config = TrainConfig(task=task, aux_mask_weight=aux)  # type: ignore[arg-type]
    model = build_model(config).to(device)
    batch = {k: v.to(device) for k, v in batch_for(task, size, batch_size).items()}
    dtype = autocast_dtype(device, amp=True) if mixed else None
    if mixed:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    began = 0.0
    for i in range(steps + 3):
        if i == 3:
            _sync(device)
            began = time.perf_counter()
        with _autocast(device, dtype):
            loss = _loss(model, batch, task, aux)  # type: ignore[arg-type]
        optimizer.zero_grad()
        torch.autograd.backward(loss)
        optimizer.step()
    _sync(device)
    return (time.perf_counter() - began) / steps * 1000


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that the wall clock covers the steps it timed."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda where torch sees a GPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    native = autocast_dtype(device, amp=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} CPU threads"
    print(f"torch {torch.__version__}, {where}, autocast dtype: {native}")
    for name, (task, size, aux) in CASES.items():
        fp32 = step_ms(task, size, aux, False, args.steps, args.batch_size, device)
        mixed = step_ms(task, size, aux, True, args.steps, args.batch_size, device)
        print(
            f"{name}: float32 {fp32:.0f} ms, mixed {mixed:.0f} ms per step of {args.batch_size}: "
            f"{fp32 / mixed:.2f}x"
        )


if __name__ == "__main__":
    main()
