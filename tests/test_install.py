"""How pacs-triage installs: the dependency declarations, constraints.txt, the hashed lock files the images
install from (requirements/*.lock, made by scripts/lock), and the base install itself.

The base install must work on a laptop or an ARM server without CUDA: its ONNX Runtime is the CPU build
(``onnxruntime``), the CUDA build is the ``gpu`` extra (``onnxruntime-gpu``), and the service imports and runs
a model with neither CUDA libraries nor torch. scripts/bootstrap keeps exactly one of the two builds, so in a
venv made without the gpu extra (CI, ``scripts/bootstrap dev``) the last tests check the real thing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
LOCKS = {"cpu": ROOT / "requirements" / "cpu.lock", "gpu": ROOT / "requirements" / "gpu.lock"}
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+?)(?: ; (?P<marker>[^\\]+?))? \\$")


def _requirements(entries: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, entries)}


def _constraints() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _lock(kind: str) -> dict[str, list[tuple[Version, str | None, int]]]:
    """name → [(version, marker, number of hashes)] of a uv/pip-compile hashed requirements file."""
    pins: dict[str, list[tuple[Version, str | None, int]]] = {}
    lines = LOCKS[kind].read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if m := PIN.match(line):
            hashes = 0
            for following in lines[i + 1 :]:
                if not following.startswith("    --hash=sha256:"):
                    break
                hashes += 1
            entry = (Version(m["version"]), m["marker"], hashes)
            pins.setdefault(canonicalize_name(m["name"]), []).append(entry)
        else:
            assert not line or line.startswith((" ", "#")), f"{LOCKS[kind].name}: unexpected line {line!r}"
    return pins


class TestDeclarations:
    def test_base_has_the_cpu_onnxruntime_and_the_gpu_extra_the_cuda_one(self) -> None:
        base = _requirements(PROJECT["dependencies"])
        extras = PROJECT["optional-dependencies"]
        assert "onnxruntime" in base and "onnxruntime-gpu" not in base
        assert set(_requirements(extras["gpu"])) == {"onnxruntime-gpu"}
        assert "torch" not in base, "the service must never need torch"

    def test_torch_is_a_range_and_its_exact_version_a_constraint(self) -> None:
        train = _requirements(PROJECT["optional-dependencies"]["train"])
        spec = train["torch"].specifier
        assert len(spec) == 2, f"torch should be a range in pyproject.toml, not {spec}"
        pinned = _constraints()["torch"]
        assert spec.contains(pinned), f"constraints.txt torch=={pinned} is outside {spec}"
        assert "-c constraints.txt" in (ROOT / "scripts" / "bootstrap").read_text(encoding="utf-8")

    def test_floors_the_code_needs(self) -> None:
        base = _requirements(PROJECT["dependencies"])
        # 0.0.13: the first python-multipart importable as `python_multipart` (service/api/stow.py)
        assert not base["python-multipart"].specifier.contains("0.0.12")
        # pydicom 3 (which the code uses) needs highdicom 0.23 or later
        assert not base["highdicom"].specifier.contains("0.22.0")
        # service/ingest and service/deliver use pynetdicom internals: a new minor release must be tried first
        assert not base["pynetdicom"].specifier.contains("3.1.0")
        build = [
            Requirement(r)
            for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
        ]
        (setuptools,) = (r for r in build if r.name == "setuptools")
        assert not setuptools.specifier.contains("76.1"), "a license string (PEP 639) needs setuptools 77"

    def test_codecs_extra_is_in_dev(self) -> None:
        extras = PROJECT["optional-dependencies"]
        assert set(_requirements(extras["codecs"])) == {"pylibjpeg-rle"}
        dev = [r for r in map(Requirement, extras["dev"]) if r.name == "pacs-triage"]
        assert dev and {"train", "codecs"} <= set(dev[0].extras)


@pytest.mark.parametrize("kind", sorted(LOCKS))
class TestLockFiles:
    def test_every_pin_is_hashed_and_exact(self, kind: str) -> None:
        pins = _lock(kind)
        assert pins, f"{LOCKS[kind].name} pins nothing"
        unhashed = sorted(name for name, entries in pins.items() if any(n == 0 for _, _, n in entries))
        assert not unhashed, f"pins without --hash in {LOCKS[kind].name}: {unhashed}"

    def test_lock_satisfies_pyproject(self, kind: str) -> None:
        """Each runtime dependency (plus the build back-end) is locked at a version pyproject.toml allows."""
        pins = _lock(kind)
        wanted = _requirements(PROJECT["dependencies"])
        wanted["setuptools"] = Requirement("setuptools>=77")
        if kind == "gpu":
            wanted.pop("onnxruntime")
            wanted.update(_requirements(PROJECT["optional-dependencies"]["gpu"]))
        for name, requirement in wanted.items():
            assert name in pins, f"{name} missing from {LOCKS[kind].name}: run scripts/lock"
            for version, _marker, _ in pins[name]:
                assert requirement.specifier.contains(version, prereleases=True), (
                    f"{LOCKS[kind].name}: {name}=={version} does not satisfy {requirement}: run scripts/lock"
                )

    def test_one_onnxruntime_at_the_tested_version(self, kind: str) -> None:
        pins = _lock(kind)
        ort, other = ("onnxruntime", "onnxruntime-gpu")[:: 1 if kind == "cpu" else -1]
        assert other not in pins, f"{LOCKS[kind].name} must not lock {other} (same package as {ort})"
        assert [v for v, _, _ in pins[ort]] == [_constraints()[ort]], "lock and constraints.txt disagree"

    def test_no_training_stack(self, kind: str) -> None:
        assert not {"torch", "onnx", "onnxscript", "pytest"} & set(_lock(kind))


# --- the installed environment ------------------------------------------------------------------------


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


BASE_IMPORT = """
import asyncio, json, sys
from pathlib import Path
import onnxruntime as ort
import service.app  # the whole service, as `pacs-triage serve` imports it
from service.inference.engine import CUDA, InferenceEngine
from service.inference.registry import ModelRegistry

async def start() -> list[str]:
    engine = InferenceEngine(ModelRegistry.from_directory(Path(sys.argv[1])), providers="auto")
    await engine.start()
    try:
        return sorted({p for name in engine.model_names for p in engine.providers_for(name)})
    finally:
        await engine.stop()

print(json.dumps({
    "cuda_listed": CUDA in ort.get_available_providers(),
    "session": asyncio.run(start()),
    "torch_imported": "torch" in sys.modules,
}))
"""


@pytest.mark.skipif(
    _installed("onnxruntime-gpu"),
    reason="onnxruntime-gpu is installed (a venv bootstrapped with the gpu extra): the base-install check "
    "needs the CPU build, which `scripts/bootstrap dev` installs in its place",
)
def test_base_install_runs_onnxruntime_without_cuda() -> None:
    """The CPU build is installed, lists no CUDA provider, and the service imports and starts the shipped
    models with ``providers=auto`` with CUDA out of reach (empty LD_LIBRARY_PATH, no visible device) and
    without torch; nothing about CUDA reaches stderr."""
    assert _installed("onnxruntime")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "LD_LIBRARY_PATH": "", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", BASE_IMPORT, str(ROOT / "models")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert not report["cuda_listed"]
    assert report["session"] == ["CPUExecutionProvider"]
    assert not report["torch_imported"], "importing the service pulled in torch"
    assert "cuda" not in run.stderr.lower() and "cublas" not in run.stderr.lower(), run.stderr


# --- the codecs extra (pylibjpeg-rle; part of dev) and the base install's decoders ------------------------


class TestCodecsExtra:
    """The optional decoders load and decode lossless test files bit-exactly against the uncompressed
    original (pydicom's ``MR_small.dcm`` and its compressed copies ship with pydicom: no download)."""

    REFERENCE = "MR_small.dcm"

    @pytest.mark.parametrize(
        ("name", "plugin"),
        [
            ("MR_small_RLE.dcm", "pylibjpeg"),  # RLE Lossless through pylibjpeg-rle
            ("MR_small_jpeg_ls_lossless.dcm", "pylibjpeg"),  # JPEG-LS Lossless (pylibjpeg-libjpeg)
            ("MR_small_jp2klossless.dcm", "pylibjpeg"),  # JPEG 2000 Lossless (pylibjpeg-openjpeg)
        ],
    )
    def test_lossless_decode_matches_the_original(self, name: str, plugin: str) -> None:
        import numpy as np
        from pydicom.pixels import pixel_array

        from tests.pydicom_files import pydicom_testdata

        reference = pixel_array(pydicom_testdata(self.REFERENCE))
        decoded = pixel_array(pydicom_testdata(name), decoding_plugin=plugin)
        assert np.array_equal(decoded, reference)

    def test_plugins_are_registered(self) -> None:
        from pydicom.pixels import get_decoder
        from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

        assert "pylibjpeg" in get_decoder(RLELossless).available_plugins
        assert "pylibjpeg" in get_decoder(JPEG2000Lossless).available_plugins
        assert "pylibjpeg" in get_decoder(JPEGLSLossless).available_plugins
