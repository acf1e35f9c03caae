"""Accuracy of models on held-out cases, per institution group, through the real pipeline.

    python bench/accuracy.py \
        --model previous=model/weights/omnet_cga.pt --model new=runs/x/best.pt \
        [--model ensemble=a.pt+b.pt] \
        [--data ../shared/data/brats2018 ../shared/data/brats-extra] \
        [--split model/splits/multisite_val.txt] \
        [--setting wide+lesion paper+pp fast+pp paper+guard+tta ...] [--json out.json]

Every case goes through :func:`model.case.process_case` (what ``omnet segment`` and
the workers run), once per model and setting. A setting names the tiling (``wide``, the
default, ``paper`` or ``fast``) followed by levers joined with ``+``: ``pp`` (the
paper's post-processing), ``guard`` (post-processing with the guarded edema
relabelling), ``rm`` (small-component removal only, no edema relabelling), ``lesion``
(small-component removal and the tumour parts more than 10 mm from the main lesion
removed: ``--postprocess main-lesion``), ``tta`` (flip averaging). Prints Dice and HD95
(WT, TC, ET) per institution group (from the case name), the mean over cases, the mean
over groups (each institution weighs the same) and the CPU seconds per case relative to
the first model and setting, measured in this run.

Settings that share a model, tiling and TTA share one network pass per case (the
probabilities are kept for the next setting); the CPU time of a setting that reused
them counts only what it ran itself (fusion, post-processing, writing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.case import CaseOutputs, process_case
from model.data import SPLITS_DIR, find_cases_in, institution_group, read_split, resolve_data_dir
from model.nifti_io import find_label_file, load_case
from model.pipeline import SegmentationOptions, load_predictor
from model.postprocess import MAIN_LESION_GAP_MM
from model.tiling import TILINGS, Predictor, TaskProbabilities

REGIONS = ("WT", "TC", "ET")


class SharedPredictor:
    """A predictor that keeps its last result, so that settings differing only after
    the network (post-processing) do not run the network again on the same case."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.device = predictor.device
        self._key: str | None = None
        self._probs: TaskProbabilities | None = None

    def predict(
        self, images: np.ndarray, mask: np.ndarray | None = None, progress: Any = None
    ) -> TaskProbabilities:
        digest = hashlib.sha1(images.tobytes())
        if mask is not None:
            digest.update(np.packbits(mask).tobytes())
        key = digest.hexdigest()
        if key != self._key or self._probs is None:
            self._probs = self.predictor.predict(images, mask, progress)
            self._key = key
        return self._probs


@dataclass(frozen=True)
class Setting:
    name: str
    tiling: str
    options: SegmentationOptions
    tta: bool

    @classmethod
    def parse(cls, text: str) -> Setting:
        tiling, *levers = text.split("+")
        unknown = set(levers) - {"pp", "guard", "rm", "lesion", "tta"}
        if tiling not in TILINGS or unknown:
            raise SystemExit(f"setting {text!r}: want TILING[+pp|+guard|+rm|+lesion][+tta]")
        relabel = "pp" in levers or "guard" in levers
        options = SegmentationOptions(
            remove_small=relabel or "rm" in levers or "lesion" in levers,
            relabel_edema=relabel,
            relabel_guard="guard" in levers,
            main_lesion_gap_mm=MAIN_LESION_GAP_MM if "lesion" in levers else None,
        )
        return cls(text, tiling, options, "tta" in levers)


def _mean(values: list[float | None]) -> float:
    finite = [v for v in values if v is not None and bool(np.isfinite(v))]
    return float(np.mean(finite)) if finite else float("nan")


def summarise(per_case: dict[str, dict[str, dict[str, float | None]]]) -> dict[str, Any]:
    """Dice and HD95 means per group, over cases and over group means."""
    groups: dict[str, list[str]] = {}
    for name in per_case:
        groups.setdefault(institution_group(name), []).append(name)

    def means(names: list[str]) -> dict[str, dict[str, float]]:
        return {
            r: {m: _mean([per_case[n][r][m] for n in names]) for m in ("dice", "hd95")}
            for r in REGIONS
        }

    by_group = {g: means(names) for g, names in sorted(groups.items())}
    macro = {
        r: {m: _mean([by_group[g][r][m] for g in by_group]) for m in ("dice", "hd95")}
        for r in REGIONS
    }
    return {"groups": by_group, "mean": means(list(per_case)), "group_mean": macro}


def _row(label: str, scores: dict[str, dict[str, float]], n: int | str) -> str:
    dice = " ".join(f"{scores[r]['dice']:.3f}" for r in REGIONS)
    hd = " ".join(f"{scores[r]['hd95']:6.1f}" for r in REGIONS)
    return f"  {label:<12} n={n!s:<3} Dice {dice}   HD95 {hd}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=CKPT[+CKPT...]")
    data_dir = resolve_data_dir(os.environ.get("OMNET_DATA_DIR"))
    parser.add_argument(
        "--data",
        type=Path,
        nargs="+",
        default=[data_dir / "brats2018", data_dir / "brats-extra"],
    )
    parser.add_argument("--split", type=Path, default=SPLITS_DIR / "multisite_val.txt")
    parser.add_argument("--setting", nargs="+", default=["wide+lesion"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    models = dict(item.split("=", 1) for item in args.model)
    settings = [Setting.parse(s) for s in args.setting]
    folders = find_cases_in(args.data)
    names = read_split(args.split)
    missing = [n for n in names if n not in folders]
    if missing:
        raise SystemExit(f"cases of {args.split} not found under {args.data}: {missing}")

    shared: dict[tuple[str, str, bool], SharedPredictor] = {}
    for m, paths in models.items():
        for s in settings:
            if (m, s.tiling, s.tta) not in shared:
                loaded = load_predictor(
                    paths.split("+"), args.device, layout=TILINGS[s.tiling], tta=s.tta
                )
                shared[(m, s.tiling, s.tta)] = SharedPredictor(loaded[0])
    predictors = {(m, s.name): shared[(m, s.tiling, s.tta)] for m in models for s in settings}
    per_case: dict[tuple[str, str], dict[str, dict[str, dict[str, float | None]]]] = {}
    seconds: dict[tuple[str, str], float] = {key: 0.0 for key in predictors}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            case = load_case(folders[name])
            reference = find_label_file(folders[name])
            for (model_name, setting_name), predictor in predictors.items():
                setting = next(s for s in settings if s.name == setting_name)
                start = time.process_time()
                report = process_case(
                    case,
                    predictor,  # type: ignore[arg-type]  # a Predictor with a memory
                    CaseOutputs(Path(tmp) / f"{name}_seg.nii.gz"),
                    setting.options,
                    reference=reference,
                )
                seconds[(model_name, setting_name)] += time.process_time() - start
                assert report.evaluation is not None
                scores = {r: m.to_dict() for r, m in report.evaluation.items()}
                per_case.setdefault((model_name, setting_name), {})[name] = scores
                dice = " ".join(f"{r} {scores[r]['dice']:.3f}" for r in REGIONS)
                print(f"{name:<24} {model_name:<10} {setting_name:<16} Dice {dice}", flush=True)

    base = next(iter(seconds.values()))
    document: dict[str, Any] = {"cases": names, "results": {}}
    print()
    for key, cases in per_case.items():
        summary = summarise(cases)
        cpu = seconds[key] / len(names)
        print(f"{key[0]} / {key[1]}: {cpu:.1f} CPU s per case ({seconds[key] / base:.2f} x)")
        for group, scores in summary["groups"].items():
            count = sum(institution_group(n) == group for n in cases)
            print(_row(group, scores, count))
        print(_row("mean", summary["mean"], len(cases)))
        print(_row("group mean", summary["group_mean"], len(summary["groups"])))
        document["results"][f"{key[0]}/{key[1]}"] = {
            **summary,
            "cpu_seconds_per_case": cpu,
            "per_case": cases,
        }
    if args.json:
        args.json.write_text(json.dumps(document, indent=1, default=float))


if __name__ == "__main__":
    main()
