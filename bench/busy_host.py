"""Whole-process time of ``omnet segment`` against MONAI's SegResNet, quiet and on a busy host.

    pip install -e '.[bench]'       # monai, for this comparison only
    python bench/busy_host.py [--case DIR] [--hogs N] [--hog-limit-s 600] [--repeats 1]
        [--no-spin-baseline] [-- OMNET SEGMENT OPTIONS ...]

A worker shares its host with the API, other workers or a training run, so this times
each contender as a fresh process, from its start to its exit (interpreter and torch
start-up, reading the case, inference, writing the label map), twice:

* quiet: nothing else is started;
* loaded: ``--hogs`` processes (default: one per core this script may use) spin on the
  CPU beside each run. Each hog exits by itself after ``--hog-limit-s`` seconds, and
  is stopped as soon as its run ends.

The contenders, one after the other in each condition and repeat:

* SegResNet: MONAI's BraTS tutorial model (``bench/segresnet_reference.py``; random
  weights, speed does not depend on them), on the case's z-scored modalities, its
  label map written as ``.nii.gz``;
* omnet: ``python -m service.cli segment CASE --out TMP --device cpu`` (what the
  ``omnet`` command runs: the bundled model, default tiling and post-processing, and the
  OpenMP wait policy of :mod:`service.openmp` unless this environment sets one);
* omnet, spinning (unless ``--no-spin-baseline``): the same segmentation through
  ``service.cli.main(argv)`` after ``import torch``, with no ``OMP_WAIT_POLICY``: the
  OpenMP runtime's default spin-waiting, as before omnet preferred passive waits.

Both use the default thread count (one per core). Prints each run's median wall and CPU
seconds and omnet's wall time as a ratio of SegResNet's, quiet and loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: A CPU hog: spins until its deadline (argv[1] seconds from its start), then exits.
HOG = """import sys, time
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
"""
#: omnet's command line without its process entry point (no wait policy is set).
OLD_ENTRY = "import sys, torch; from service.cli import main; sys.exit(main(sys.argv[1:]))"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def busy_cpu(hogs: int, limit_s: float) -> Iterator[None]:
    """``hogs`` spinning processes, each exiting by itself after ``limit_s`` seconds and
    stopped when the block ends."""
    procs = [
        subprocess.Popen([sys.executable, "-c", HOG, str(limit_s)], stdin=subprocess.DEVNULL)
        for _ in range(hogs)
    ]
    try:
        time.sleep(0.5)  # the hogs are spinning before the timed run starts
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()


def timed_process(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Runs ``cmd`` to its exit; its wall and CPU (user + system) seconds."""
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"{cmd[:4]} ... exited with status {proc.returncode}:\n{tail}")
    return wall, usage.ru_utime + usage.ru_stime


def contenders(
    case: Path, out: Path, omnet_args: list[str], spin_baseline: bool
) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Name -> (command, environment) of each process to time."""
    segment = ["segment", str(case), "--out", str(out), "--device", "cpu", *omnet_args]
    env = dict(os.environ)
    segresnet = [sys.executable, str(Path(__file__).resolve()), "--case", str(case)]
    runs = {
        "SegResNet (MONAI)": ([*segresnet, "--run-segresnet", str(out / "seg.nii.gz")], env),
        "omnet segment": ([sys.executable, "-m", "service.cli", *segment], env),
    }
    if spin_baseline:
        spinning = {k: v for k, v in env.items() if k != "OMP_WAIT_POLICY"}
        runs["omnet segment, spin-waiting"] = (
            [sys.executable, "-c", OLD_ENTRY, *segment],
            spinning,
        )
    return runs


def run_segresnet(case: Path, out: Path) -> None:
    """The SegResNet process: reads the case, segments it, writes a BraTS label map."""
    sys.path.insert(0, str(HERE))
    import nibabel as nib
    import numpy as np
    from segresnet_reference import segresnet, segresnet_regions

    from model.io.nifti.read import load_case

    loaded = load_case(case)
    tc, wt, et = segresnet_regions(segresnet(), loaded.images)  # (X, Y, Z) each
    labels = np.zeros(wt.shape, np.uint8)
    labels[wt] = 2
    labels[tc] = 1
    labels[et] = 4
    nib.save(nib.Nifti1Image(labels, loaded.affine), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--case", type=Path, default=None, help="a BraTS case folder")
    parser.add_argument("--hogs", type=int, default=_cores(), help="spinning processes")
    parser.add_argument("--hog-limit-s", type=float, default=600.0, help="a hog's longest life")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-spin-baseline", action="store_true")
    parser.add_argument("--run-segresnet", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("omnet_args", nargs="*", help="more omnet segment options, after --")
    args = parser.parse_args()
    if args.case is None:
        from model.training.data import resolve_data_dir

        data = resolve_data_dir(os.environ.get("OMNET_DATA_DIR"))
        args.case = data / "brats2018" / "Brats18_CBICA_AMH_1"
    if args.run_segresnet:
        run_segresnet(args.case, args.run_segresnet)
        return

    policy = os.environ.get("OMP_WAIT_POLICY") or "unset: omnet sets PASSIVE"
    print(
        f"case {args.case.name}, {_cores()} cores, CPU, default threads; OMP_WAIT_POLICY "
        f"{policy}; loaded: {args.hogs} spinning processes; median of {args.repeats}"
    )
    seconds: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        runs = contenders(args.case, out, args.omnet_args, not args.no_spin_baseline)
        for condition in ("quiet", "loaded"):
            for _ in range(args.repeats):
                for name, (cmd, env) in runs.items():
                    load = (
                        busy_cpu(args.hogs, args.hog_limit_s)
                        if condition == "loaded"
                        else contextlib.nullcontext()
                    )
                    with load:
                        result = timed_process(cmd, env, out / "log.txt")
                    seconds.setdefault((condition, name), []).append(result)
                    print(f"  {condition:<6} {name:<30} {result[0]:7.1f} s", flush=True)

    print(f"\n{'condition':<10}{'process':<32}{'wall s':>8}{'CPU s':>8}  wall / SegResNet")
    ratios = {}
    for condition in ("quiet", "loaded"):
        base = median(w for w, _ in seconds[(condition, "SegResNet (MONAI)")])
        for name in runs:
            wall = median(w for w, _ in seconds[(condition, name)])
            cpu = median(c for _, c in seconds[(condition, name)])
            ratios[(condition, name)] = wall / base
            print(f"{condition:<10}{name:<32}{wall:8.1f}{cpu:8.1f}  {wall / base:.2f} x")
    print(
        f"\nomnet segment / SegResNet: quiet {ratios[('quiet', 'omnet segment')]:.2f} x, "
        f"loaded {ratios[('loaded', 'omnet segment')]:.2f} x"
    )


if __name__ == "__main__":
    main()
