"""What the segmentation model costs a head CT analysis: ``analyse_study`` timed side by side, with and
without ``ct-hemorrhage-seg`` loaded, on a negative and on a positive generated series.

Why this measure: the service runs the U-net only on series the classifier flags (issue 16), so a negative
study should cost the same with or without it (ratio ~1.0) and a positive one pays for the second model and
the measurement. Both configurations run in the same process, interleaved round by round, so a loaded machine
slows both alike; the ratios are what to read. The shipped models are used with the classifier's
input-domain gate set aside (as in tests/e2e/test_seg_roundtrip.py), so a generator newer than the shipped
models does not turn the series into "not analysed".

Usage: ``python bench/bench_segment.py [--rounds 7] [--data data/synthetic/ct]``. Give ``--data`` the set
the shipped models were trained on when the generator has moved on: the classifier then calls the negative
series negative (on newer images it may call every series positive).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pydicom import dcmread

from service.analyse import analyse_study
from service.inference.engine import InferenceEngine
from service.inference.registry import ModelRegistry
from service.routing import load_rules
from service.store.instances import InstanceRecord
from training.data.synthetic import generate_ct

ROOT = Path(__file__).resolve().parents[1]


def _models(out: Path, names: list[str]) -> Path:
    for name in names:
        shutil.copytree(ROOT / "models" / name, out / name)
    card = json.loads((out / "ct-hemorrhage" / "card.json").read_text())
    card["domain"] = None
    (out / "ct-hemorrhage" / "card.json").write_text(json.dumps(card))
    return out


async def _series(root: Path, data: Path | None, classifier: InferenceEngine) -> dict[str, list[Path]]:
    """The largest bleed, and a series without blood that the classifier calls negative (from ``data``, a
    generated folder with labels.csv, else a fresh one)."""
    labels = data / "labels.csv" if data else generate_ct(root / "ct", n_patients=10, seed=5)
    base = labels.parent
    with labels.open() as fh:
        rows = list(csv.DictReader(fh))
    files: dict[str, list[Path]] = {r["series_uid"]: [] for r in rows}
    for r in rows:
        files[r["series_uid"]].append(base / r["file"])
    bleeds = [r for r in rows if r["hemorrhage"] == "1"]
    positive = max(bleeds, key=lambda r: float(r["info_hemorrhage_size_mm"] or 0))["series_uid"]
    flagged = {r["series_uid"] for r in bleeds}
    for uid in (u for u in files if u not in flagged):
        _, called = await _time(classifier, files[uid], positive_only=True)
        if not called:
            return {"negative": files[uid], "positive": files[positive]}
    raise SystemExit("no series the classifier calls negative; generate more patients")


async def _time(
    engine: InferenceEngine, files: list[Path], positive_only: bool = False
) -> tuple[float, bool]:
    """Seconds of one analysis, and whether it segmented (``positive_only``: whether a finding was
    positive)."""
    datasets = [dcmread(f) for f in files]  # parsed up front, as an HTTP request holds them
    records = [
        InstanceRecord(str(d.SOPInstanceUID), str(d.SeriesInstanceUID), str(d.SOPClassUID), "CT", "HEAD", f)
        for d, f in zip(datasets, files, strict=True)
    ]
    cards = {n: m.card for n, m in engine.registry.models.items()}
    rules = load_rules(ROOT / "service" / "routing_rules.yaml")
    began = time.perf_counter()
    analysis = await analyse_study(
        records, rules=rules, cards=cards, load_errors={}, engine=engine, priority=0,
        datasets={str(d.SOPInstanceUID): d for d in datasets},
    )  # fmt: skip
    seconds = time.perf_counter() - began
    if positive_only:
        return seconds, any(f.positive for f in analysis.findings)
    return seconds, any(f.segments for f in analysis.findings)


async def main(rounds: int, data: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        engines = {
            "classifier": InferenceEngine(
                ModelRegistry.from_directory(_models(root / "a", ["ct-hemorrhage"])), providers="cpu"
            ),
            "classifier+seg": InferenceEngine(
                ModelRegistry.from_directory(_models(root / "b", ["ct-hemorrhage", "ct-hemorrhage-seg"])),
                providers="cpu",
            ),
        }
        for engine in engines.values():
            await engine.start()
        series = await _series(root / "data", data, engines["classifier"])
        times: dict[tuple[str, str], list[float]] = {}
        segmented: dict[tuple[str, str], bool] = {}
        for _ in range(rounds):
            for kind, files in series.items():
                for name, engine in engines.items():
                    seconds, seg = await _time(engine, files)
                    times.setdefault((kind, name), []).append(seconds)
                    segmented[(kind, name)] = seg
        for engine in engines.values():
            await engine.stop()
    print("| series | slices | classifier only | classifier + seg | ratio | segmented |")
    print("|---|---|---|---|---|---|")
    for kind, files in series.items():
        a = statistics.median(times[(kind, "classifier")]) * 1000
        b = statistics.median(times[(kind, "classifier+seg")]) * 1000
        print(
            f"| {kind} | {len(files)} | {a:.0f} ms | {b:.0f} ms | {b / a:.2f}x | "
            f"{segmented[(kind, 'classifier+seg')]} |"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--data", type=Path, help="a generated head CT folder (labels.csv); default: generate")
    args = ap.parse_args()
    asyncio.run(main(args.rounds, args.data))
