"""Accuracy of a checkpoint on held-out cases: paper vs fast tiling, with and without
post-processing, from one inference per tiling.

    python bench/accuracy.py --checkpoint model/weights/omnet_cga.pt \
        [--data ../shared/data/brats2018] [--split model/splits/brats2018_val.txt] \
        [--tilings paper fast] [--json out.json]

Prints Dice and HD95 per case and their means for WT, TC and ET, and the inference
time of each tiling relative to the paper tiling, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from model.data import SPLITS_DIR, default_data_dir, read_split
from model.fusion import fuse
from model.labels import ENHANCING
from model.metrics import evaluate_case, summarise
from model.nifti_io import find_label_file, load_case, load_labels
from model.pipeline import from_canonical, load_predictor, to_canonical
from model.postprocess import postprocess
from model.preprocess import paste, preprocess
from model.tiling import TILINGS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", nargs="+", required=True)
    parser.add_argument("--data", type=Path, default=default_data_dir() / "brats2018")
    parser.add_argument("--split", type=Path, default=SPLITS_DIR / "brats2018_val.txt")
    parser.add_argument("--tilings", nargs="+", default=["paper", "fast"], choices=sorted(TILINGS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    names = read_split(args.split)
    results: dict[str, dict[str, dict]] = {}
    seconds: dict[str, float] = {t: 0.0 for t in args.tilings}
    predictors = {
        t: load_predictor(args.checkpoint, args.device, layout=TILINGS[t])[0] for t in args.tilings
    }
    for name in names:
        folder = args.data / name
        case = load_case(folder)
        label_file = find_label_file(folder)
        if label_file is None:
            raise SystemExit(f"{folder} has no label map")
        reference = load_labels(label_file, like=case)
        prep = preprocess(to_canonical(case.images, case.affine))
        for tiling in args.tilings:
            start = time.perf_counter()
            probs = predictors[tiling].predict(prep.images, prep.mask)
            seconds[tiling] += time.perf_counter() - start
            raw = fuse(probs, prep.mask)
            variants = {f"{tiling}": raw}
            variants[f"{tiling}+pp"] = postprocess(raw, prep.images)
            for key, labels in variants.items():
                full = from_canonical(paste(labels, prep), case.affine)
                scores = evaluate_case(full, reference, case.spacing, ENHANCING, ENHANCING)
                results.setdefault(key, {})[name] = scores
                dice = " ".join(f"{r} {m.dice:.3f}" for r, m in scores.items())
                hd = " ".join(f"{m.hd95:.1f}" for m in scores.values())
                print(f"{name:<24} {key:<10} Dice {dice}  HD95 {hd}", flush=True)

    print()
    summary = {}
    for key, cases in results.items():
        mean = summarise(cases)
        summary[key] = mean
        print(
            f"mean {key:<10} Dice WT {mean['WT']['dice']:.3f} TC {mean['TC']['dice']:.3f} "
            f"ET {mean['ET']['dice']:.3f}  HD95 WT {mean['WT']['hd95']:.2f} "
            f"TC {mean['TC']['hd95']:.2f} ET {mean['ET']['hd95']:.2f} mm"
        )
    base = seconds.get("paper") or next(iter(seconds.values()))
    for tiling, s in seconds.items():
        print(f"inference {tiling:<6} {s / len(names):7.1f} s per case ({s / base:.2f} x paper)")
    if args.json:
        doc = {
            "cases": names,
            "mean": summary,
            "per_case": {
                k: {c: {r: m.to_dict() for r, m in v.items()} for c, v in cases.items()}
                for k, cases in results.items()
            },
            "inference_seconds_per_case": {t: s / len(names) for t, s in seconds.items()},
        }
        args.json.write_text(json.dumps(doc, indent=1, default=float))


if __name__ == "__main__":
    main()
