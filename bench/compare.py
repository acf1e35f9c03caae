"""Paired comparison of two results of ``bench/accuracy.py --json`` on the same cases.

    python bench/compare.py bench/site-runs/base-sites.json \
        bench/site-runs/clipped-sites.json [--setting wide+lesion+guard]
    python bench/compare.py all.json:oof/wide+lesion+guard all.json:oof/wide+lesion+guard+mirror \
        [--folds 0 1 2]

Each argument is a document, optionally followed by ``:MODEL/SETTING`` to pick one of
its results (by default its only result, or the one whose setting is ``--setting``).
Prints, per region, the Dice of both on every shared case, the mean paired difference
(second minus first) with a 95 % bootstrap interval (resampling cases), how many cases
each wins by more than 0.01, and the worst case of each; ``--folds`` keeps the cases of
those cross-validation folds only (as the first document names them). Two recipes measured on a
handful of cases differ by chance as often as not: a difference whose interval holds 0
is no reason to change a default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import REGIONS, bootstrap_interval

#: A case "wins" for one side when its Dice is higher by more than this.
MARGIN = 0.01


def load(spec: str) -> dict[str, Any]:
    """The document ``spec`` (``PATH`` or ``PATH:MODEL/SETTING``) is in."""
    return json.loads(Path(spec.partition(":")[0]).read_text())


def pick(spec: str, setting: str | None) -> tuple[str, dict[str, Any]]:
    """The result ``spec`` names (``PATH`` or ``PATH:MODEL/SETTING``) and its label."""
    path, _, key = spec.partition(":")
    results = load(spec)["results"]
    if not key:
        keys = [k for k in results if setting is None or k.endswith(f"/{setting}")]
        if len(keys) != 1:
            raise SystemExit(f"{path}: name one of {sorted(results)} (PATH:MODEL/SETTING)")
        key = keys[0]
    if key not in results:
        raise SystemExit(f"{path}: no result {key!r}; it has {sorted(results)}")
    return key, results[key]


def paired(
    first: dict[str, Any], second: dict[str, Any], only: set[str] | None = None
) -> dict[str, Any]:
    """Per region: each side's Dice on the shared cases (those of ``only``, when given),
    the paired differences and their summary."""
    shared = set(first["per_case"]) & set(second["per_case"])
    cases = sorted(shared if only is None else shared & only)
    if not cases:
        raise SystemExit("the two results share no case")
    out: dict[str, Any] = {"cases": cases}

    def dice(result: dict[str, Any], region: str) -> np.ndarray:
        values = [result["per_case"][c][region]["dice"] for c in cases]
        return np.array([np.nan if v is None else v for v in values], dtype=float)

    for region in REGIONS:
        a, b = dice(first, region), dice(second, region)
        scored = np.isfinite(a) & np.isfinite(b)  # a region neither could score is left out
        a, b = a[scored], b[scored]
        diff = b - a
        out[region] = {
            "cases": [c for c, kept in zip(cases, scored, strict=True) if kept],
            "first": a.tolist(),
            "second": b.tolist(),
            "mean_difference": float(diff.mean()),
            "interval": bootstrap_interval(diff.tolist()),
            "second_wins": int((diff > MARGIN).sum()),
            "first_wins": int((diff < -MARGIN).sum()),
            "worst": (float(a.min()), float(b.min())),
        }
    return out


def summary(result: dict[str, Any]) -> list[str]:
    """One line per region of :func:`paired`'s result: the mean difference (second minus
    first) with its interval, the cases each side wins and each side's worst case."""
    lines = []
    for region in REGIONS:
        r = result[region]
        low, high = r["interval"]
        lines.append(
            f"{region}: mean {r['mean_difference']:+.3f} [{low:+.3f}, {high:+.3f}]"
            f"   wins {r['first_wins']} first / {r['second_wins']} second"
            f"   worst {r['worst'][0]:.3f} / {r['worst'][1]:.3f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("first", help="PATH[:MODEL/SETTING]")
    parser.add_argument("second", help="PATH[:MODEL/SETTING]")
    parser.add_argument("--setting", help="the setting to pick where a document has several")
    parser.add_argument("--folds", nargs="+", metavar="N", help="only the cases of these folds")
    args = parser.parse_args(argv)
    first_key, first = pick(args.first, args.setting)
    second_key, second = pick(args.second, args.setting)
    only = None
    if args.folds:
        folds = load(args.first).get("folds", {})
        wanted = {f"fold{n}" for n in args.folds}
        only = {case for case, fold in folds.items() if fold in wanted}
        if not only:
            raise SystemExit(f"{args.first}: no case in folds {' '.join(args.folds)}")
    result = paired(first, second, only)
    print(f"first:  {first_key}\nsecond: {second_key}\n")
    header = " ".join(f"{r:>13s}" for r in REGIONS)
    print(f"{'case':26s} {header}")
    for case in result["cases"]:
        cells = []
        for region in REGIONS:
            r = result[region]
            if case in r["cases"]:
                i = r["cases"].index(case)
                cells.append(f"{r['first'][i]:.3f}->{r['second'][i]:.3f}")
            else:
                cells.append(f"{'-':>12s}")
        print(f"{case:26s} {' '.join(cells)}")
    print(f"\n{len(result['cases'])} cases; second minus first:")
    for line in summary(result):
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
