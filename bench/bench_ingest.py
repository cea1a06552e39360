"""C-STORE ingest: pacs-triage vs DCMTK ``storescp`` (plain and made durable) vs Orthanc, side by side.

1. **Ingest rate.** The same N-instance CT series (512x512, 16-bit, ~514 KiB each, as in PEERS.md) is sent
   by ``--associations`` concurrent ``storescu`` processes (1 and 4 by default) to, each fresh per round:
   (a) ``storescp -od DIR`` (DCMTK writes each file, no fsync: it has no option for it); (b) the same
   ``storescp`` made durable by an LD_PRELOAD shim that fsyncs every regular file on ``close``/``fclose``
   (written and compiled here, :data:`SHIM_C`); (c) Orthanc with its defaults (SQLite index);
   (d) ``pacs-triage serve`` (each instance written into a slot file made ahead, with ``O_DIRECT``, and
   fdatasync'd before the success status, renamed into place in the background, rows in group commits:
   service/store/slots.py), and (e) the same with ``dicom.journal`` off (the instance's file and directory
   fsynced before success).
   Instances per second, best of ``--rounds`` interleaved runs (every other round in reverse order); ratios
   of ours to each, of the bests and the median of each round's ratio (the rate drifts by a third within
   an hour here, so a round's ratio, taken minutes apart, is the fairer one). Goals (issue 20):
   >= 1.0x durable storescp and >= 0.5x plain storescp on one association, >= 0.7x plain storescp with 4,
   >= 2x Orthanc. Under the rates, what each send cost (:mod:`send_cost`): the receiver's CPU per instance
   (its processes), the senders', and the cores busy, medians of the rounds: the senders share this
   machine's cores, so a receiver that computes slows them where one that waits does not.
   Also the network path alone: ``storescp --ignore`` (receives and discards) vs our listener with the
   store call replaced by parsing (what the upper layer costs without the disk).
   And the store alone (no network, from 1 and 4 threads): each row committed before its answer
   (``Instances.ingest_blocking``, the listener's path before the group commit) against the group commit
   (``GroupCommit.store``), with and without slots: the ceiling of the durable rate.
   And **one instance per association** (``associations``): ``--per-association`` instances, each sent by
   its own ``storescu`` run (a modality that opens an association per image): milliseconds per run, the
   same ``storescu`` against each receiver, interleaved rounds. ``storescu`` proposes every storage SOP
   class it knows (120 presentation contexts), so this is mostly association set-up and release.
2. **Two overlapping senders.** One ``storescu`` alone, then two at once (each its own study of N): the
   rate each of the two got, as a fraction of the one alone. Goal >= 0.45x each (no collapse).
3. **Time to flag.** From the moment ``storescu`` returns (the last instance acknowledged) to the study's
   result over REST, for ``--studies`` head CT series (32 slices with ImagesInAcquisition: complete when
   full) and chest radiographs (complete when their association is released); for the radiographs also to
   our SR stored in Orthanc, the PACS the service delivers to (issue 20: <= 1 s). p50 / p95. A positive
   head CT's first result is its flag (``measurements_pending``, before the segmentation); the measured
   result that supersedes it is timed on its own line.

Usage::

    .venv/bin/python bench/bench_ingest.py [--instances 300] [--rounds 2] [--studies 10] [--quiet 5]
        [--per-association 40] [--skip network ingest associations store overlap flag]

Needs DCMTK, Orthanc and a C compiler (``scripts/install-peers``). TCP_NODELAY=1 is set for DCMTK and
Orthanc (PEERS.md). Compare ratios, not absolute numbers, between runs: the machine is shared. Every
measured send starts on a synced disk and no receiver's files are removed before the bench ends
(:func:`ingest_rig.kept`: on ext4 without a journal, deletions tax the next receiver's file creations); the
hypervisor's steal during the sends is printed at the end where there was any.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest_rig import (  # noqa: E402  (bench/ is the script's own directory)
    ENV,
    Listening,
    Receiver,
    Service,
    compile_shim,
    ct_series,
    orthanc_receiver,
    ours,
    settle,
    split,
    storescp_receiver,
    storescu,
)
from send_cost import Cost, Meter, print_steal  # noqa: E402

from service.store.files import disk_space  # noqa: E402
from tests.peers.orthanc import Orthanc  # noqa: E402
from training.data.synthetic import generate_ct, generate_cxr  # noqa: E402

T = TypeVar("T")
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR: the result we deliver


@contextlib.contextmanager
def _our_network_path(work: Path) -> Iterator[Listening]:
    """Our listener in this process with the store call replaced by the assembly and the attribute scan
    the listener does: what the upper layer costs without the disk (compare ``storescp --ignore``, which
    receives and discards)."""
    from service.config import DicomSettings
    from service.ingest.scp import DicomListener
    from service.store.database import Database
    from service.store.instances import Instances

    store = Instances(Database(f"sqlite:///{work / 'unused.sqlite'}"), work / "unused")
    listener = DicomListener(DicomSettings(host="127.0.0.1", port=0), store, quiet_seconds=5)

    def parse_only(request):  # type: ignore[no-untyped-def]
        data, size, _ = listener._assemble(request)  # as the listener assembles and checks it
        if isinstance(data, memoryview):
            listener._checked(data, size)
        return 0, ""

    listener.handle_store = parse_only  # type: ignore[method-assign]
    listener.start()
    try:
        yield Listening(listener.port, "PACS_TRIAGE", os.getpid())  # (its CPU is not read: one process)
    finally:
        listener.stop()
        store.db.close()


def _network(paths: list[Path], work: Path, rounds: int) -> None:
    receivers: dict[str, Receiver] = {
        "storescp --ignore": storescp_receiver(None, ignore=True),
        "pacs-triage, no store call": _our_network_path,
    }
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, receiver in receivers.items():
            best[name] = max(best.get(name, 0.0), len(paths) / _seconds(receiver, work, [paths])[0][0])
    ours = best["pacs-triage, no store call"]
    print(f"\nnetwork path only (nothing written), 1 association, best of {rounds}:")
    theirs = best["storescp --ignore"]
    print(f"  storescp --ignore            {theirs:7.0f} instances/s")
    print(f"  pacs-triage, no store call   {ours:7.0f} instances/s   ratio {ours / theirs:5.2f}x")


def _store_alone(paths: list[Path], work: Path, associations: list[int]) -> None:
    """The store with no network, from 1 and 4 threads: each instance's row committed before its answer
    (``Instances.ingest_blocking``, the listener's path before the group commit) against the group commit
    (``GroupCommit.store``: answered once the file and its directory are fsynced, rows after). The ceiling
    the listener's durable rate can reach."""
    from concurrent.futures import ThreadPoolExecutor
    from datetime import timedelta

    from service.clock import utcnow
    from service.config import AssemblySettings
    from service.store.database import Database
    from service.store.group_commit import GroupCommit
    from service.store.instances import Instances
    from service.store.slot_place import Placer, replay_slots
    from service.store.slots import SlotStore
    from service.store.validate import ParsedInstance, parse_instance

    parsed = [parse_instance(p.read_bytes(), part=p.name, images_only=False) for p in paths]
    print(f"\nthe store alone ({len(paths)} instances, no network, SQLite synchronous=FULL):")
    for n in associations:
        rates = {}
        for how in ("row committed before the answer", "group commit (file fsynced, row after)", "slots"):
            root = work / f"store-alone-{n}"
            root.mkdir()
            store = Instances(Database(f"sqlite:///{root / 'db.sqlite'}"), root / "instances")
            placer = None
            if how == "slots":  # answered once the slot is fdatasync'd; renamed into place, then row, after
                replay_slots(slots := SlotStore(root / "slots"), store, quiet_seconds=60)
                placer = Placer(slots, store)
            commits = GroupCommit(store, quiet_seconds=60, assembly=AssemblySettings(), placer=placer)
            commits.start()
            later = utcnow() + timedelta(seconds=60)
            one: Callable[[ParsedInstance], object] = (
                functools.partial(store.ingest_blocking, not_before=later)
                if how.startswith("row")
                else functools.partial(commits.store, held=True)
            )
            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                list(pool.map(one, parsed))
            answered = time.perf_counter() - t0
            commits.flush()
            rows = time.perf_counter() - t0
            commits.stop()
            store.db.close()
            shutil.rmtree(root)
            rates[how] = len(paths) / answered
            print(
                f"  {n} thread(s), {how:40s} {len(paths) / answered:6.0f} answered/s"
                f"  ({len(paths) / rows:4.0f} rows/s)"
            )
        before, after, slotted = rates.values()
        print(f"  {n} thread(s), group commit / row before answer = {after / before:5.2f}x")
        print(f"  {n} thread(s), slots / group commit = {slotted / after:5.2f}x")


def _seconds(receiver: Receiver, work: Path, shares: list[list[Path]]) -> tuple[list[float], Cost]:
    """Seconds each concurrent sender took, and what the send cost (:mod:`send_cost`); one fresh receiver
    per call, started on a settled disk."""
    settle()
    with receiver(work) as listening, Meter(listening.pid) as meter:
        seconds = storescu(listening.port, listening.aet, shares)
    STEAL.append(meter.cost.steal)
    return seconds, meter.cost


STEAL: list[float] = []
"""Share of the machine's time the hypervisor took (``steal`` in /proc/stat) during each measured send:
a run where it was high measured the host, not the receivers."""


BASELINES = ("storescp", "storescp-fsync", "orthanc", "one-process", "journal-off")
"""The ingest section's receivers beside ours (``--receivers``): all of them by default."""


def _receivers(
    shim: Path,
    before: Path | None,
    *,
    journal_off: bool = True,
    processes: int = 1,
    only: Sequence[str] = BASELINES,
) -> dict[str, Receiver]:
    """The receivers compared, each started fresh per measurement; with ``processes`` above one, ours with
    ``dicom.processes`` set so, beside ours as configured by default. ``only``: the baselines wanted
    (:data:`BASELINES`; fewer of them leave time for more rounds of a paired comparison)."""
    named: dict[str, tuple[str, Receiver]] = {
        "storescp": ("storescp -od (no fsync)", storescp_receiver(None)),
        "storescp-fsync": ("storescp -od + fsync shim", storescp_receiver(shim)),
        "orthanc": ("Orthanc (defaults, SQLite)", orthanc_receiver),
        "one-process": ("pacs-triage, 1 process", ours()),
        "journal-off": ("pacs-triage, dicom.journal off", ours(PACS_TRIAGE_DICOM__JOURNAL="false")),
    }
    unset = {"journal-off": not journal_off, "one-process": processes == 1}  # nothing to compare against
    wanted = [key for key in BASELINES if key in only and not unset.get(key, False)]
    peers = ("storescp", "storescp-fsync", "orthanc")  # the others first, then ours, then ours otherwise set
    receivers = dict(named[key] for key in wanted if key in peers)
    receivers["pacs-triage"] = ours(PACS_TRIAGE_DICOM__PROCESSES=str(processes))
    receivers.update(named[key] for key in wanted if key not in peers)
    if before:
        receivers["pacs-triage before"] = ours(before)
    return receivers


def _interleaved(
    receivers: dict[str, Receiver], rounds: int, rate: Callable[[Receiver], T]
) -> dict[str, list[T]]:
    """``rate(receiver)`` of every receiver in each round, every other round in reverse order."""
    rates: dict[str, list[T]] = {name: [] for name in receivers}
    for r in range(rounds):
        for name in list(receivers)[:: 1 if r % 2 == 0 else -1]:
            rates[name].append(rate(receivers[name]))
    return rates


def _print_rates(title: str, rates: dict[str, list[float]], unit: str) -> None:
    """Each receiver's best rate and ours against it: of the bests, and the median of each round's ratio."""
    ours = rates["pacs-triage"]
    print(f"\n{title}; median of each round's ratio:")
    for name, rate in rates.items():
        if name == "pacs-triage":
            print(f"  {name:28s} {max(rate):7.1f} {unit}")
            continue
        best = max(ours) / max(rate)
        per_round = statistics.median(o / t for o, t in zip(ours, rate, strict=True))
        print(
            f"  {name:28s} {max(rate):7.1f} {unit}   pacs-triage / this = {best:5.2f}x"
            f"   median of rounds {per_round:5.2f}x"
        )
    for name, rate in rates.items():  # each round, for the spread behind the two ratios
        print(f"    {name[:26]:26s} rounds: {' '.join(f'{r:.0f}' for r in rate)}")


def _ingest(
    paths: list[Path],
    work: Path,
    rounds: int,
    associations: list[int],
    shim: Path,
    before: Path | None,
    processes: int,
    only: Sequence[str] = BASELINES,
) -> None:
    receivers = _receivers(shim, before, processes=processes, only=only)
    for n in associations:
        sends = _interleaved(receivers, rounds, functools.partial(_rate, work, split(paths, n)))
        title = f"{n} association(s), {len(paths)} instances, best of {rounds}"
        if processes > 1:
            title += f" (pacs-triage: dicom.processes {processes})"
        _print_rates(title, {name: [rate for rate, _ in each] for name, each in sends.items()}, "instances/s")
        _print_costs({name: [cost for _, cost in each] for name, each in sends.items()}, len(paths))


def _rate(work: Path, shares: list[list[Path]], receiver: Receiver) -> tuple[float, Cost]:
    """Instances per second (all of them over the slowest sender's time), and what the send cost."""
    seconds, cost = _seconds(receiver, work, shares)
    return sum(len(share) for share in shares) / max(seconds), cost


def _print_costs(costs: dict[str, list[Cost]], instances: int) -> None:
    """CPU per instance of each receiver and of the senders, and the busy cores, medians of the rounds;
    ours against each: a receiver that is slower but waits (cores idle) differs from one that computes."""
    print("  CPU per instance, median of rounds (the receiver's processes; the storescu senders):")

    def median(name: str, of: Callable[[Cost], float]) -> float:
        return statistics.median(of(cost) for cost in costs[name])

    ours = median("pacs-triage", lambda c: c.receiver_s)
    for name in costs:
        receiver = median(name, lambda c: c.receiver_s)
        line = (
            f"    {name[:26]:26s} {receiver / instances * 1e6:6.0f} us, senders"
            f" {median(name, lambda c: c.senders_s) / instances * 1e6:4.0f} us;"
            f" {median(name, lambda c: c.busy_cores):4.2f} cores busy"
        )
        if name != "pacs-triage" and receiver > 0:
            line += f"   pacs-triage / this = {ours / receiver:5.2f}x the CPU"
        print(line)


def _one_run(port: int, aet: str, path: Path) -> float:
    """Seconds one ``storescu`` run took to send ``path`` on its own association (and to exit)."""
    t0 = time.perf_counter()
    subprocess.run(
        ["storescu", "-aet", "BENCH", "-aec", aet, "127.0.0.1", str(port), str(path)],
        env=ENV,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def _one_per_association(paths: list[Path], work: Path, rounds: int, shim: Path, before: Path | None) -> None:
    """Each instance on its own association, one ``storescu`` run after another: associations per second
    (one over the median run's seconds)."""

    def rate(receiver: Receiver) -> float:
        with receiver(work) as listening:
            return 1 / statistics.median(_one_run(listening.port, listening.aet, path) for path in paths)

    rates = _interleaved(_receivers(shim, before, journal_off=False), rounds, rate)
    title = f"one instance per association ({len(paths)} storescu runs each), best of {rounds}"
    _print_rates(title, rates, "associations/s")


def _overlap(paths: list[Path], work: Path, rounds: int, shim: Path, before: Path | None) -> None:
    """One sender alone, then two at once with a study each: each one's rate against the one alone."""
    other = ct_series(work / "series-b", len(paths))
    print(f"\ntwo overlapping senders, {len(paths)} instances each, best of {rounds}:")
    receivers = [("storescp -od + fsync shim", storescp_receiver(shim)), ("pacs-triage", ours())]
    if before:
        receivers.append(("pacs-triage before", ours(before)))
    for name, receiver in receivers:
        alone, pair = 0.0, [0.0, 0.0]
        for _ in range(rounds):
            alone = max(alone, len(paths) / _seconds(receiver, work, [paths])[0][0])
            both, _ = _seconds(receiver, work, [paths, other])
            pair = [max(p, len(paths) / t) for p, t in zip(pair, both, strict=True)]
        print(
            f"  {name:28s} alone {alone:5.0f}/s; overlapping {pair[0]:5.0f}/s and {pair[1]:5.0f}/s"
            f" = {pair[0] / alone:4.2f}x and {pair[1] / alone:4.2f}x of alone (goal >= 0.45x each)"
        )


def _time_to_flag(work: Path, n: int, quiet: float) -> dict[str, list[float]]:
    src = work / "ttf"
    ct_labels = generate_ct(src / "ct", n_patients=n, seed=3)
    cxr_labels = generate_cxr(src / "cxr", n_patients=n, seed=3)
    series: dict[str, list[Path]] = {}
    for line in ct_labels.read_text().splitlines()[1:]:
        file = line.split(",")[0]
        series.setdefault(str(Path(file).parent), []).append(src / "ct" / file)
    cxrs = [src / "cxr" / line.split(",")[0] for line in cxr_labels.read_text().splitlines()[1:]][:n]
    from pydicom import dcmread

    out: dict[str, list[float]] = {
        "ct (complete when full)": [],
        "ct: measured result (segmentation)": [],
        "cr (complete at association end)": [],
        "cr: our SR stored in Orthanc": [],
    }
    pacs = Orthanc.start(work / "ttf-orthanc", aet="ORTHANC")
    service = Service(work, quiet=quiet, PACS_TRIAGE_DELIVERY__DESTINATIONS=json.dumps([pacs.peer_text]))
    try:
        for name, files in list(series.items())[:n]:
            ds = [dcmread(f) for f in files]
            folder = work / "ttf-send" / name
            folder.mkdir(parents=True)
            for i, d in enumerate(ds):
                d.ImagesInAcquisition = len(ds)
                d.save_as(folder / f"{i}.dcm", enforce_file_format=True)
            sent = sorted(folder.iterdir())
            storescu(service.dicom, "PACS_TRIAGE", [sent])
            t0 = time.perf_counter()
            service.wait_result(str(ds[0].StudyInstanceUID))
            out["ct (complete when full)"].append(time.perf_counter() - t0)
            service.wait_result(str(ds[0].StudyInstanceUID), measured=True)
            out["ct: measured result (segmentation)"].append(time.perf_counter() - t0)
        for path in cxrs:
            folder = work / "ttf-send" / path.stem
            folder.mkdir(parents=True)
            shutil.copy(path, folder)
            storescu(service.dicom, "PACS_TRIAGE", [[folder / path.name]])
            t0 = time.perf_counter()
            study_uid = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
            service.wait_result(study_uid)
            out["cr (complete at association end)"].append(time.perf_counter() - t0)
            _wait_sr(pacs, study_uid)
            out["cr: our SR stored in Orthanc"].append(time.perf_counter() - t0)
    finally:
        service.stop()
        pacs.stop()
    return out


def _wait_sr(pacs: Orthanc, study_uid: str, timeout: float = 60) -> None:
    """Until Orthanc (the PACS we deliver to) holds our SR of the study: the flag the radiologist sees."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while time.monotonic() < deadline:
        for iid in set(pacs.find("Instance", {"StudyInstanceUID": study_uid})) - seen:
            seen.add(iid)
            if pacs.instance_tags(iid).get("SOPClassUID") == SR_CLASS:
                return
        time.sleep(0.005)
    raise TimeoutError("our SR never reached Orthanc")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _disk_note(work: Path, need: int) -> None:
    """The data disk as the services will see it: above the watermark they refuse instances (0xA700), and
    the figures no longer measure a receive. ``need``: what the measured sends will leave there (every
    receiver's files are kept to the end, :func:`ingest_rig.kept`)."""
    space = disk_space(work)
    print(
        f"data disk: {space.fraction_used:.0%} used (as df shows it), "
        f"{space.available / 2**30:.1f} GiB available; this run keeps ~{need / 2**30:.1f} GiB to its end"
    )
    if space.room_below(0.95) < need + (2 << 30):  # the default watermark
        print(
            "WARNING: the run's files would come within 2 GiB of the 95 % watermark: the services may"
            " refuse instances; free the disk or pass fewer --instances or --rounds"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--quiet", type=float, default=5.0, help="quiet timer (default: the service's)")
    parser.add_argument(
        "--associations", type=int, nargs="+", default=[1, 4], help="concurrent storescu associations"
    )
    parser.add_argument(
        "--per-association", type=int, default=40, help="instances sent one per association (associations)"
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["network", "ingest", "associations", "store", "overlap", "flag"],
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="dicom.processes of the service measured in the ingest section (beside the default's)",
    )
    parser.add_argument(
        "--receivers",
        nargs="+",
        default=list(BASELINES),
        choices=BASELINES,
        help="the baselines of the ingest section (default: all); ours is always measured",
    )
    parser.add_argument(
        "--compare-tree",
        type=Path,
        default=None,
        help="another source tree (e.g. main, `git archive` into a folder) run as a second pacs-triage",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        shim = compile_shim(work)
        paths = ct_series(work / "series", args.instances)
        size = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        print(f"{args.instances} CT instances of {size:.0f} KiB; DCMTK storescu senders, TCP_NODELAY=1")
        # series kept to the end: per ingest round each baseline, ours and --compare-tree's; per overlap
        # round three sends (alone, then two) of each of three receivers
        sends = (
            0 if "ingest" in args.skip else args.rounds * len(args.associations) * (2 + len(args.receivers))
        )
        sends += 0 if "overlap" in args.skip else args.rounds * 3 * 3
        _disk_note(work, int(size * 1024) * args.instances * sends)
        if "network" not in args.skip:
            _network(paths, work, args.rounds)
        if "ingest" not in args.skip:
            _ingest(
                paths,
                work,
                args.rounds,
                args.associations,
                shim,
                args.compare_tree,
                args.processes,
                args.receivers,
            )
        if "associations" not in args.skip:
            _one_per_association(paths[: args.per_association], work, args.rounds, shim, args.compare_tree)
        if "store" not in args.skip:
            _store_alone(paths, work, args.associations)
        if "overlap" not in args.skip:
            _overlap(paths, work, args.rounds, shim, args.compare_tree)
        if "flag" not in args.skip:
            print(f"\ntime to flag: from the last instance acknowledged ({args.studies} studies each)")
            for kind, values in _time_to_flag(work, args.studies, args.quiet).items():
                print(
                    f"  {kind:34s} p50 {statistics.median(values) * 1000:7.0f} ms   "
                    f"p95 {_pct(values, 0.95) * 1000:7.0f} ms   (n={len(values)})"
                )
        print_steal(STEAL)


if __name__ == "__main__":
    main()
