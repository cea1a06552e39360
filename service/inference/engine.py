"""ONNX Runtime sessions behind a priority micro-batcher; inference never runs on the event loop.

Why micro-batching: a GPU runs 8 images in about the time of 1, so concurrent requests for one model are
merged into one session run. On a 2-core CPU batching buys ~3 % (PEERS.md), so the batcher must cost next
to nothing when nothing is concurrent: it waits ``max_wait_ms`` for company only when the previous run was
a batch (a sign that callers are concurrent), and otherwise runs a lone item at once.

Why priorities: a stat study (suspected pneumothorax) must not wait behind a backlog of routine ones. Each
model has a heap ordered by (priority, arrival), so stat items go first and equal priorities stay FIFO.

How it runs: one dispatcher task and one single-thread executor per model. The dispatcher takes up to
``max_batch`` images from the heap, concatenates them, runs the session in the executor thread (ORT releases
the GIL), and splits the outputs back to each caller's future. While a batch runs, new work queues up and
forms the next batch, so under load batches fill without any waiting. A failed run fails every caller in it
with :class:`InferenceError`; the dispatcher keeps going.

Provider choice (``providers``): ``"cpu"``; ``"cuda"`` (CUDA or the model fails to start); ``"auto"``: CUDA
when an NVIDIA driver is present and ONNX Runtime's CUDA provider actually loads, else CPU. The decision is
read from ``session.get_providers()`` after creation, because onnxruntime-gpu lists CUDA as "available" on
machines where it cannot load (PEERS.md). ORT's own error log for that failed load is silenced during the
attempt and replaced by one line of ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import heapq
import io
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import onnxruntime as ort

from service.errors import InferenceError, NotReadyError
from service.inference.backend import check_images, joined, unknown_model, warmup_shape
from service.inference.registry import LoadedModel, ModelRegistry
from service.metrics import EngineMetrics
from service.results.schema import Priority

__all__ = [
    "BatchStats",
    "InferenceEngine",
    "ProviderChoice",
]

logger = logging.getLogger(__name__)

ProviderChoice = Literal["auto", "cpu", "cuda"]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

_ORT_WARNING = 2  # ORT's default logger severity
_ORT_FATAL = 4


class _Session(Protocol):
    """The part of :class:`onnxruntime.InferenceSession` the engine uses (a seam for tests)."""

    def run(self, output_names: Sequence[str] | None, input_feed: dict[str, Any]) -> list[Any]: ...

    def get_providers(self) -> list[str]: ...


SessionFactory = Callable[[LoadedModel, list[str], ort.SessionOptions], _Session]


def _ort_session(model: LoadedModel, providers: list[str], options: ort.SessionOptions) -> _Session:
    session: _Session = ort.InferenceSession(str(model.onnx_path), options, providers=providers)
    return session


@dataclass
class BatchStats:
    """Counts of session runs by batch size for one model (tests and ``/v1/models`` read it)."""

    runs: int = 0
    images: int = 0
    sizes: Counter[int] = field(default_factory=Counter)

    @property
    def max_batch(self) -> int:
        return max(self.sizes, default=0)


@dataclass(order=True)
class _Item:
    priority: int
    seq: int
    images: np.ndarray = field(compare=False)
    future: asyncio.Future[dict[str, np.ndarray]] = field(compare=False)


class _ModelRunner:
    """The heap, dispatcher task and executor thread of one model."""

    def __init__(self, engine: InferenceEngine, model: LoadedModel, session: _Session) -> None:
        self.engine = engine
        self.model = model
        self.session = session
        self.providers = list(session.get_providers())
        self.input_name = model.card.input.name
        self.output_names = list(model.card.outputs)
        self.heap: list[_Item] = []
        self.queued_images = 0
        self.wakeup = asyncio.Event()
        self.stats = BatchStats()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{model.name}")
        self.task: asyncio.Task[None] | None = None
        self.last_batch_items = 0
        self.busy = False

    def submit(self, item: _Item) -> None:
        heapq.heappush(self.heap, item)
        self.queued_images += len(item.images)
        self._report_depth()
        self.wakeup.set()

    def _report_depth(self) -> None:
        if self.engine.metrics is not None:
            self.engine.metrics.set_queue_depth(self.model.name, self.queued_images)

    def _take_batch(self) -> list[_Item]:
        """Pop items in (priority, arrival) order up to ``max_batch`` images; cancelled ones are dropped."""
        batch: list[_Item] = []
        size = 0
        while self.heap:
            head = self.heap[0]
            if head.future.done():  # caller gave up (cancelled) while queued
                heapq.heappop(self.heap)
                self.queued_images -= len(head.images)
                continue
            if batch and size + len(head.images) > self.engine.max_batch:
                break
            heapq.heappop(self.heap)
            self.queued_images -= len(head.images)
            batch.append(head)
            size += len(head.images)
        self._report_depth()
        return batch

    async def loop(self) -> None:
        max_batch = self.engine.max_batch
        max_wait = self.engine.max_wait_ms / 1000.0
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            # one trip round the loop lets callers that were scheduled in the same tick enqueue too
            await asyncio.sleep(0)
            if not self.heap:
                continue
            if self.queued_images < max_batch and max_wait > 0 and self.last_batch_items > 1:
                # callers were concurrent a moment ago: give the batch a little time to fill
                deadline = time.perf_counter() + max_wait
                while self.queued_images < max_batch:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self.wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wakeup.wait(), remaining)
            while self.heap:
                batch = self._take_batch()
                if not batch:
                    break
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        arrays = [item.images for item in batch]
        images = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        n = len(images)
        self.last_batch_items = len(batch)
        self.busy = True
        started = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self.executor, self._run_session, images)
            self.busy = False
        except asyncio.CancelledError:  # engine stopping: nobody may wait forever
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(InferenceError("inference engine stopped during this run"))
            raise
        except Exception as exc:  # any ORT failure: hand it to every waiting caller, keep serving
            self.busy = False
            logger.error("model %s: batch of %d images failed: %s", self.model.name, n, exc)
            for item in batch:
                if not item.future.done():
                    error = InferenceError(f"model {self.model.name}: inference failed: {exc}")
                    error.__cause__ = exc
                    item.future.set_exception(error)
            return
        elapsed = time.perf_counter() - started
        self.stats.runs += 1
        self.stats.images += n
        self.stats.sizes[n] += 1
        if self.engine.metrics is not None:
            self.engine.metrics.observe_batch(self.model.name, n, elapsed)
        offset = 0
        for item in batch:
            k = len(item.images)
            if not item.future.done():
                item.future.set_result({name: out[offset : offset + k] for name, out in outputs.items()})
            offset += k

    def _run_session(self, images: np.ndarray) -> dict[str, np.ndarray]:
        results = self.session.run(self.output_names, {self.input_name: images})
        outputs = {name: np.asarray(value) for name, value in zip(self.output_names, results, strict=True)}
        for name, value in outputs.items():
            if value.ndim == 0 or value.shape[0] != len(images):
                raise RuntimeError(f"output {name} has shape {value.shape}, expected first dim {len(images)}")
        return outputs


class InferenceEngine:
    """One ONNX Runtime session per registry model, behind a per-model priority micro-batcher.

    Parameters
    ----------
    registry
        Loaded models; a model whose session cannot start is moved to ``registry.errors``.
    max_batch
        Most images in one session run. A call with more images is split across runs and reassembled.
    max_wait_ms
        How long a batch waits for more work once it has some, applied only while callers are concurrent.
    providers
        ``"auto"``, ``"cpu"`` or ``"cuda"`` (see the module docstring).
    intra_op_threads
        ORT intra-op threads per session; 0 lets ORT choose (one per physical core).
    metrics
        Where batch sizes, run times and queue depths go (:class:`service.metrics.Metrics`), if anywhere.
    intra_op_spinning
        Let ORT's idle intra-op threads spin after a run. Off by default: each session has its own pool, and
        spinning threads of one model slow the next model's run on the same cores (measured: two sessions
        run alternately on 2 cores took 73 ms per run with spinning, 38 ms without, 37 ms for one alone),
        and they steal CPU from the event loop, DICOM decoding and the database.
    session_factory
        Builds a session from ``(model, providers, options)``; tests pass a wrapper to slow or fail runs.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        max_batch: int = 8,
        max_wait_ms: float = 2.0,
        providers: ProviderChoice = "auto",
        intra_op_threads: int = 0,
        metrics: EngineMetrics | None = None,
        intra_op_spinning: bool = False,
        session_factory: SessionFactory = _ort_session,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        if providers not in ("auto", "cpu", "cuda"):
            raise ValueError(f"providers must be auto, cpu or cuda, not {providers!r}")
        self.registry = registry
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.providers = providers
        self.intra_op_threads = intra_op_threads
        self.metrics = metrics
        self.intra_op_spinning = intra_op_spinning
        self._session_factory = session_factory
        self._runners: dict[str, _ModelRunner] = {}
        self._seq = itertools.count()
        self._ready = False

    @property
    def ready(self) -> bool:
        """True once every model's session has started and been warmed up (``/healthz/ready``)."""
        return self._ready

    @property
    def model_names(self) -> list[str]:
        """Models the engine serves (started successfully)."""
        return list(self._runners)

    async def start(self) -> None:
        """Create, warm up and start serving every registry model; failures go to the registry's errors.

        Sessions are created in a worker thread (a large model takes seconds), one model after another so
        that start-up does not compete with itself for cores. Calling ``start`` twice does nothing.
        """
        if self._ready or self._runners:
            return
        cuda_wanted = self._cuda_wanted()
        for name, model in list(self.registry.models.items()):
            try:
                session = await asyncio.to_thread(self._create_session, model, cuda_wanted)
            except Exception as exc:  # ORT raises its own exception types for bad graphs/providers
                self.registry.mark_failed(name, f"ONNX Runtime could not start the model: {exc}")
                continue
            runner = _ModelRunner(self, model, session)
            try:
                warm = np.zeros(warmup_shape(model.card), dtype=np.float32)
                await asyncio.get_running_loop().run_in_executor(runner.executor, runner._run_session, warm)
            except asyncio.CancelledError:  # start-up abandoned (app shutting down): release the thread
                runner.executor.shutdown(wait=False)
                raise
            except Exception as exc:  # a graph that loads but cannot run is as unusable
                runner.executor.shutdown(wait=False)
                self.registry.mark_failed(name, f"warm-up run failed: {exc}")
                continue
            runner.task = asyncio.create_task(runner.loop(), name=f"batcher-{name}")
            self._runners[name] = runner
            logger.info("model %s ready on %s", name, ", ".join(runner.providers))
        self._ready = True

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Refuse new work, let queued work finish for up to ``drain_timeout`` s, then fail what is left.

        Callers still waiting after the drain get :class:`InferenceError`; executor threads are released.
        """
        self._ready = False
        runners, self._runners = self._runners, {}
        deadline = time.perf_counter() + drain_timeout
        for runner in runners.values():
            while (runner.heap or runner.busy) and time.perf_counter() < deadline:
                await asyncio.sleep(0.005)
        for runner in runners.values():
            if runner.task is not None:
                runner.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner.task
            for item in runner.heap:
                if not item.future.done():
                    item.future.set_exception(InferenceError("inference engine stopped before this ran"))
            runner.heap.clear()
            runner.queued_images = 0
            await asyncio.to_thread(runner.executor.shutdown, wait=True)

    def providers_for(self, name: str) -> list[str]:
        """Execution providers the session of ``name`` actually runs on, e.g. ``["CPUExecutionProvider"]``."""
        return list(self._runner(name).providers)

    def queue_depth(self, name: str) -> int:
        """Images queued for ``name``, not counting the batch in flight."""
        return self._runner(name).queued_images

    def batch_stats(self, name: str) -> BatchStats:
        """Session runs and their batch sizes so far for ``name``."""
        return self._runner(name).stats

    async def run(
        self, model_name: str, images: np.ndarray, priority: int = Priority.ROUTINE
    ) -> dict[str, np.ndarray]:
        """Run ``images [n, C, H, W]`` through ``model_name``; outputs by name, first dimension ``n``.

        Parameters
        ----------
        model_name
            A model the engine serves.
        images
            Float32 model input for ``n`` images (preprocessed with the model card's spec).
        priority
            0 stat, 1 urgent, 2 routine: lower goes first when work is queued.

        Raises
        ------
        NotReadyError
            The engine has not started (or has stopped).
        UnknownModelError
            No such model is being served.
        ValueError
            ``images`` is empty or does not fit the model's input shape.
        InferenceError
            The session run failed.
        """
        if not self._ready:
            raise NotReadyError("the inference engine is not ready (starting up or shutting down)")
        runner = self._runner(model_name)
        images = check_images(images, runner.model.card)
        if len(images) == 0:
            raise ValueError(f"model {model_name}: no images to run")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[dict[str, np.ndarray]]] = []
        for start in range(0, len(images), self.max_batch):
            future: asyncio.Future[dict[str, np.ndarray]] = loop.create_future()
            chunk = images[start : start + self.max_batch]
            runner.submit(_Item(int(priority), next(self._seq), chunk, future))
            futures.append(future)
        return await joined(futures, runner.output_names)  # cancelling us cancels the queued items

    def _runner(self, name: str) -> _ModelRunner:
        runner = self._runners.get(name)
        if runner is None:
            raise unknown_model(name, self.registry.errors)
        return runner

    def _cuda_wanted(self) -> bool:
        if self.providers == "cpu":
            return False
        if CUDA not in ort.get_available_providers():
            reason = "this onnxruntime build has no CUDA execution provider"
        elif not _nvidia_driver_present():
            reason = "no NVIDIA driver (libcuda.so.1) on this machine"
        else:
            _load_cuda_libraries()
            return True
        if self.providers == "cuda":
            logger.error("providers=cuda but CUDA cannot be used: %s", reason)
            return True  # let each model fail to start with a clear reason
        logger.info("inference on CPU: %s", reason)
        return False

    def _create_session(self, model: LoadedModel, cuda: bool) -> _Session:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.intra_op_spinning else "0"
        )
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not cuda:
            return self._session_factory(model, [CPU], options)
        # ORT logs a red error when the CUDA provider library cannot load and then falls back to CPU;
        # we decide from get_providers() and say so ourselves, once, at the right level.
        options.log_severity_level = _ORT_FATAL
        ort.set_default_logger_severity(_ORT_FATAL)
        try:
            session = self._session_factory(model, [CUDA, CPU], options)
        finally:
            ort.set_default_logger_severity(_ORT_WARNING)
        if CUDA not in session.get_providers():
            if self.providers == "cuda":
                raise RuntimeError(
                    "providers=cuda but the CUDA execution provider did not load (CUDA 13, cuDNN 9?)"
                )
            logger.warning(
                "model %s: CUDA execution provider did not load (needs CUDA 13 and cuDNN 9); using CPU",
                model.name,
            )
        return session


@functools.cache
def _load_cuda_libraries() -> None:
    """Load CUDA and cuDNN from NVIDIA's pip wheels, if installed, before the first CUDA session.

    ORT's CUDA provider library finds libcudart, libcublas and libcudnn by soname, and the ones that
    ``pip install onnxruntime-gpu[cuda,cudnn]`` brings (the nvidia-* wheels) are not on the loader's path:
    without this the provider fails to load and the service runs on CPU. ``preload_dlls`` (onnxruntime-gpu
    1.21+) loads them from site-packages first; libraries on the system path (a CUDA image) still work
    without it. It prints what it cannot load; the session's providers are what we report instead.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:  # the CPU build, or onnxruntime-gpu before 1.21
        return
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            preload()
    except (OSError, RuntimeError) as exc:
        logger.info("CUDA libraries not preloaded from NVIDIA's wheels: %s", exc)


def _nvidia_driver_present() -> bool:
    """Whether the NVIDIA driver library loads: without it the CUDA provider cannot work at all."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True
