"""Fusion rules and the fusion's lines (whole tumour, core, ET), chosen out of fold.

    python bench/calibration.py dump --crossval bench/cv-runs-landmarks [--folds 0 1] \
        [--out runs/calibration/landmarks] [--tta off|mirror|all]
    python bench/calibration.py sweep runs/calibration/landmarks [runs/calibration/zscore] \
        [--wt 0.4 0.45 0.5] [--core 0.35 0.4 0.45 0.5] [--et 0.5] \
        [--setting wide+lesion+guard+mirror+noshell+regions ...] [--json out.json]

Everything after the network (fusion, post-processing) can be tried again on the same
probabilities. The region rule with moved lines
(:class:`model.inference.fusion.RegionThresholds`) trades sensitivity for precision, and
other fusion rules use the tasks differently. Which, if any, is chosen here on cases
that do not report it.

``dump`` runs every case of the cross-validation folds through the fold model that never
trained on it, with the default tiling and precision and the default test-time
augmentation (or ``--tta``'s), and keeps
the network's probabilities (float16, on the brain's crop; ``runs/`` is not kept).

Several stores given to ``sweep`` are averaged per task, as the predictor averages an
ensemble's members: models whose fold runs share the folds (``bench/cv-runs`` and
``bench/cv-runs-landmarks``) make an out-of-fold ensemble, even across normalisations
(the first store's normalisation prepares the case for the post-processing).

``sweep`` labels every case with the default inference's fusion and post-processing (the
baseline, ``default``), with each ``bench/accuracy.py`` setting given (only its fusion
and post-processing count) and with the region rule at every combination of the lines
given, through the product's own stages after the network
(:func:`model.inference.pipeline.label_probabilities`), and scores Dice against the
reference. Then, fold by fold, it chooses the candidate with the best mean Dice (over
the three regions) on the other folds alone and applies it to the fold left out: the
``nested`` result is what choosing this way gives on cases that did not choose it,
paired with the baseline as ``bench/compare.py`` pairs two results. ``--json`` writes
an ``accuracy.py``-shaped document (``oof/default``, ``oof/nested`` and one result per
candidate) that ``bench/compare.py`` reads. (The documents written before the joint
fusion became the default name the baseline ``oof/argmax``: it was the arg-max then.)

Probabilities stored in float16 move a few borderline voxels against the run that
stored them; the baseline is computed from the same stored probabilities, so the pairing
is fair. A choice is then confirmed through the real pipeline with
``bench/accuracy.py --crossval ... --setting ...``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import REGIONS, Setting, crossval_models, fold_of  # noqa: E402
from compare import paired, summary  # noqa: E402

from model.defaults import DEFAULT_PRECISION, DEFAULT_TILING, DEFAULT_TTA  # noqa: E402
from model.inference.fusion import RegionThresholds  # noqa: E402
from model.inference.pipeline import (  # noqa: E402
    SegmentationOptions,
    label_probabilities,
    load_predictor,
    to_canonical,
)
from model.inference.preprocess import Preprocessed, preprocess  # noqa: E402
from model.inference.tiling import LAYOUTS, TTA_PASSES, TaskProbabilities  # noqa: E402
from model.io.nifti.files import find_label_file  # noqa: E402
from model.io.nifti.read import load_case, load_labels  # noqa: E402
from model.io.volumes import Case  # noqa: E402
from model.labels import region_mask, to_brats2018  # noqa: E402
from model.training.data import find_cases_in, resolve_data_dir  # noqa: E402

#: The default inference's fusion and post-processing, against which the rest is paired.
BASELINE = "default"
NESTED = "nested"

#: Case -> region -> {"dice": ...}, as ``bench/accuracy.py`` documents hold them.
PerCase = dict[str, dict[str, dict[str, float]]]


def prepared(case: Case, normalisation: str) -> Preprocessed:
    """The case as the pipeline hands it to the network."""
    return preprocess(to_canonical(case.images, case.affine), normalisation=normalisation)


def dump(
    runs: Path, folds: list[int] | None, out: Path, data: list[Path], tta: str = DEFAULT_TTA
) -> None:
    oof = crossval_models(runs, "last.pt", folds)
    if not oof:
        raise SystemExit(f"no finished fold run under {runs}")
    folders = find_cases_in(data)
    out.mkdir(parents=True, exist_ok=True)
    predictors: dict[str, Any] = {}
    for name in sorted(oof):
        target = out / f"{name}.npz"
        if target.exists():
            continue
        checkpoint = oof[name]
        if checkpoint not in predictors:
            predictors[checkpoint] = load_predictor(
                [checkpoint],
                "cpu",
                layout=LAYOUTS[DEFAULT_TILING],
                tta=tta,
                precision=DEFAULT_PRECISION,
            )[0]
        predictor = predictors[checkpoint]
        start = time.perf_counter()
        prep = prepared(load_case(folders[name]), predictor.normalisation)
        probs = predictor.predict(prep.images, prep.mask)
        partial = target.with_suffix(".partial.npz")
        np.savez_compressed(
            partial,
            **{k: getattr(probs, k).astype(np.float16) for k in TaskProbabilities._fields},
            normalisation=np.array(predictor.normalisation),
            checkpoint=np.array(checkpoint),
        )
        partial.rename(target)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)


def combinations(
    wt: list[float], core: list[float], et: list[float], settings: list[str] | tuple[str, ...] = ()
) -> dict[str, SegmentationOptions]:
    """Setting name -> options: the default inference, the ``bench/accuracy.py``
    ``settings`` given (their fusion and post-processing; the network pass is the stored
    one), then the region rule at each combination of lines (names as ``bench/accuracy.py``
    levers)."""
    out = {BASELINE: SegmentationOptions()}
    out |= {name: Setting.parse(name).options for name in settings}
    for w, c, e in itertools.product(wt, core, et):
        name = f"regions+wt{round(w * 100):02d}+core{round(c * 100):02d}+et{round(e * 100):02d}"
        out[name] = SegmentationOptions(
            fusion="regions", thresholds=RegionThresholds(whole=w, core=c, enhancing=e)
        )
    return out


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    both = int(pred.sum()) + int(ref.sum())
    return 2.0 * int(np.count_nonzero(pred & ref)) / both if both else 1.0


def stored_probabilities(stores: list[Path], name: str) -> tuple[TaskProbabilities, str]:
    """A case's stored probabilities, averaged per task over ``stores`` (an ensemble of
    the models that stored them, as :class:`~model.inference.tiling.Predictor` averages
    its members), and the first store's input normalisation."""
    saved = [np.load(store / f"{name}.npz") for store in stores]
    probs = TaskProbabilities(
        *(
            np.mean([s[k].astype(np.float32) for s in saved], axis=0)
            for k in TaskProbabilities._fields
        )
    )
    return probs, str(saved[0]["normalisation"])


def sweep(
    stores: list[Path], settings: dict[str, SegmentationOptions], data: list[Path]
) -> dict[str, PerCase]:
    """Setting -> case -> region -> {"dice": ...}, for every case the first store holds
    (with several stores, their probabilities averaged)."""
    folders = find_cases_in(data)
    out: dict[str, PerCase] = {name: {} for name in settings}
    for path in sorted(stores[0].glob("*.npz")):
        if path.name.endswith(".partial.npz"):
            continue
        name = path.name.removesuffix(".npz")
        missing = [str(s) for s in stores[1:] if not (s / path.name).exists()]
        if missing:
            raise SystemExit(f"{name}: not stored under {', '.join(missing)}")
        start = time.perf_counter()
        probs, normalisation = stored_probabilities(stores, name)
        case = load_case(folders[name])
        prep = prepared(case, normalisation)
        label_file = find_label_file(folders[name])
        if label_file is None:
            raise SystemExit(f"{name}: no reference label map under {folders[name]}")
        reference = to_brats2018(load_labels(label_file, like=case))
        for setting, options in settings.items():
            labels = label_probabilities(probs, prep, case.affine, options).labels
            out[setting][name] = {
                r: {"dice": dice(region_mask(labels, r), region_mask(reference, r))}
                for r in REGIONS
            }
        base = " ".join(f"{out[BASELINE][name][r]['dice']:.3f}" for r in REGIONS)
        print(f"{name}: {BASELINE} {base} ({time.perf_counter() - start:.0f} s)", flush=True)
    return out


def mean_dice(per_case: PerCase, names: list[str]) -> float:
    return float(np.mean([per_case[n][r]["dice"] for n in names for r in REGIONS]))


def nested(scores: dict[str, PerCase], folds: dict[str, str]) -> tuple[PerCase, dict[str, str]]:
    """Each fold's cases labelled with the setting chosen on the other folds alone (the
    best mean Dice over the three regions; ties go to the earlier setting, the baseline
    first); and fold -> the setting chosen for it."""
    chosen: dict[str, str] = {}
    out: PerCase = {}
    cases = sorted(scores[BASELINE])
    for fold in sorted({folds[n] for n in cases}):
        rest = [n for n in cases if folds[n] != fold]
        best = max(scores, key=lambda s: (mean_dice(scores[s], rest), -list(scores).index(s)))
        chosen[fold] = best
        out.update({n: scores[best][n] for n in cases if folds[n] == fold})
    return out, chosen


def report(scores: dict[str, PerCase], folds: dict[str, str]) -> dict[str, Any]:
    names = sorted(scores[BASELINE])
    print(f"\n{'setting':<36} " + " ".join(f"{r:>6}" for r in REGIONS) + "   mean  worst WT")
    for setting, per_case in scores.items():
        means = [np.mean([per_case[n][r]["dice"] for n in names]) for r in REGIONS]
        worst = min(per_case[n]["WT"]["dice"] for n in names)
        row = " ".join(f"{m:6.3f}" for m in means)
        print(f"{setting:<36} {row} {np.mean(means):6.3f} {worst:6.3f}")
    picked, chosen = nested(scores, folds)
    print("\nchosen on the other folds: " + ", ".join(f"{f} {s}" for f, s in chosen.items()))
    results: dict[str, Any] = {f"oof/{s}": {"per_case": c} for s, c in scores.items()}
    results[f"oof/{NESTED}"] = {"per_case": picked, "chosen": chosen}
    comparison = paired(results[f"oof/{BASELINE}"], results[f"oof/{NESTED}"])
    print(f"nested (second) against {BASELINE} (first), {len(names)} cases:")
    for line in summary(comparison):
        print(f"  {line}")
    return {"folds": folds, "results": results, "comparison": comparison}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data_dir = resolve_data_dir(os.environ.get("OMNET_DATA_DIR"))
    data = [data_dir / "brats2018", data_dir / "brats-extra"]
    p_dump = sub.add_parser("dump", help="keep the fold models' out-of-fold probabilities")
    p_dump.add_argument("--crossval", type=Path, required=True, metavar="RUNS")
    p_dump.add_argument("--folds", nargs="+", type=int)
    p_dump.add_argument("--out", type=Path, default=ROOT / "runs" / "calibration" / "landmarks")
    p_dump.add_argument(
        "--tta", choices=sorted(TTA_PASSES), default=DEFAULT_TTA, help="test-time augmentation"
    )
    p_sweep = sub.add_parser("sweep", help="label, score and choose the lines out of fold")
    p_sweep.add_argument(
        "stored",
        type=Path,
        nargs="+",
        help="stored probabilities; several are averaged, as an ensemble of their models",
    )
    p_sweep.add_argument("--wt", nargs="*", type=float, default=[0.4, 0.45, 0.5])
    p_sweep.add_argument("--core", nargs="*", type=float, default=[0.35, 0.4, 0.45, 0.5])
    p_sweep.add_argument("--et", nargs="*", type=float, default=[0.5])
    p_sweep.add_argument(
        "--setting",
        nargs="+",
        default=[],
        help="bench/accuracy.py settings to try besides the lines (only their fusion and "
        "post-processing count)",
    )
    p_sweep.add_argument("--json", type=Path)
    for p in (p_dump, p_sweep):
        p.add_argument("--data", type=Path, nargs="+", default=data)
    args = parser.parse_args()
    if args.command == "dump":
        dump(args.crossval, args.folds, args.out, args.data, args.tta)
        return
    settings = combinations(args.wt, args.core, args.et, args.setting)
    scores = sweep(args.stored, settings, args.data)
    document = report(scores, fold_of(sorted(scores[BASELINE])))
    if args.json:
        args.json.write_text(json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
