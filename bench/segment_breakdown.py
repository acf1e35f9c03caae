"""Where a whole ``omnet segment`` process spends its time: start-up, imports, the
checkpoint, reading the case, inference, writing, exit.

    python bench/segment_breakdown.py [--case DIR] [--repeats 3] [--code-dir OLD_CHECKOUT]
        [-- OMNET SEGMENT OPTIONS ...]

Each repeat runs, as fresh processes with this interpreter (default thread count, the
bundled model, ``--device cpu``):

1. ``python -c pass``: the interpreter's own start-up;
2. the imports a segmentation needs (the command line, the pipeline, the case path);
3. the same, then the checkpoint loaded into a predictor;
4. ``python -m service.cli segment CASE --out TMP``, whose report gives the stages of
   :func:`model.inference.case.process_case` (``timings_s``: load, preprocess,
   inference, fusion, postprocess, write).

The breakdown (medians over the repeats): interpreter; imports (2 - 1); checkpoint
(3 - 2); the report's stages; and the rest of the process (4 - 3 - the report's total:
argument parsing, finding the files, the summary line, exit). ``--code-dir`` runs the
same with another checkout of the project on ``PYTHONPATH`` (e.g. a ``git worktree`` of
an earlier commit), alternating with this one within each repeat, so that the two are
compared on the same machine in the same minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

IMPORTS = (
    "import service.cli.segment, model.inference.pipeline, model.inference.case, "
    "model.io.nifti.read"
)
IMPORTS_OLD = "import service.cli.segment, model.pipeline, model.case, model.nifti_io"
CHECKPOINT = (
    "from model.weights import bundled_checkpoint; "
    "{pipeline}.load_predictor([bundled_checkpoint()], device='cpu')"
)
STAGES = ("load", "preprocess", "inference", "fusion", "postprocess", "write")


def _default_case() -> Path:
    data = Path(os.environ.get("OMNET_DATA_DIR", REPO.parent / "shared" / "data"))
    cases = sorted(p for p in (data / "brats2018").glob("*") if p.is_dir())
    if not cases:
        raise SystemExit(f"no BraTS case under {data / 'brats2018'}; give one with --case")
    return cases[0]


def _wall(args: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(args, env=env, cwd=cwd, check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def measure(code: Path, case: Path, extra: list[str], out: Path) -> dict[str, float]:
    """One repeat of the four processes for the project in ``code``."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    py = sys.executable
    old = not (code / "model" / "inference").is_dir()
    imports = IMPORTS_OLD if old else IMPORTS
    pipeline = "model.pipeline" if old else "model.inference.pipeline"
    load = f"{imports}; import {pipeline}; " + CHECKPOINT.format(pipeline=pipeline)
    interpreter = _wall([py, "-c", "pass"], env, code)
    imported = _wall([py, "-c", imports], env, code)
    loaded = _wall([py, "-c", load], env, code)
    segment = [py, "-m", "service.cli", "segment", str(case), "--out", str(out)]
    whole = _wall([*segment, "--device", "cpu", *extra], env, code)
    (report_file,) = out.glob("*_metrics.json")
    timings = json.loads(report_file.read_text())["timings_s"]
    result = {
        "process": whole,
        "interpreter": interpreter,
        "imports": imported - interpreter,
        "checkpoint": loaded - imported,
    }
    result.update({stage: float(timings.get(stage, 0.0)) for stage in STAGES})
    result["rest"] = whole - loaded - float(timings["total"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--case", type=Path, default=None, help="a BraTS case folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--code-dir", type=Path, help="another checkout to compare")
    parser.add_argument("omnet_args", nargs="*", help="more omnet segment options, after --")
    args = parser.parse_args()
    case = args.case or _default_case()
    codes = {"this": REPO}
    if args.code_dir:
        codes["other"] = args.code_dir.resolve()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in codes}
    for repeat in range(args.repeats):
        for name, code in codes.items():
            with tempfile.TemporaryDirectory() as tmp:
                runs[name].append(measure(code, case, args.omnet_args, Path(tmp)))
            print(f"repeat {repeat + 1}/{args.repeats} {name}: {runs[name][-1]['process']:.1f} s")
    keys = list(next(iter(runs.values()))[0])
    print(f"\ncase {case.name}, {os.cpu_count()} CPUs, medians of {args.repeats} (seconds)")
    header = f"{'part':<12}" + "".join(f"{name:>10}" for name in codes)
    if len(codes) == 2:
        header += f"{'this/other':>12}"
    print(header)
    for key in keys:
        values = [median(r[key] for r in runs[name]) for name in codes]
        line = f"{key:<12}" + "".join(f"{v:>10.2f}" for v in values)
        if len(values) == 2 and values[1] > 0.05:
            line += f"{values[0] / values[1]:>12.2f}"
        print(line)
    medians = {name: {k: median(r[k] for r in runs[name]) for k in keys} for name in codes}
    print(json.dumps({"case": case.name, "repeats": args.repeats, "medians": medians}))


if __name__ == "__main__":
    main()
