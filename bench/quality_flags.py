"""Chooses the quality flag's thresholds on some folds and measures them on the others.

    python bench/quality_flags.py bench/cv-runs-landmarks/oof/all-mirror.json \
        [--setting oof/wide+lesion+guard+mirror+noshell+joint] [--failure 0.70] \
        [--max-false-alarms 0.10] [--max-tests 1] [--measures task_agreement ...]

Reads ``bench/accuracy.py --crossval --json`` documents (each case's Dice and quality
measures, out of fold) and asks which rule on the measures flags the failures (WT Dice
below ``--failure``) while flagging at most ``--max-false-alarms`` of the other cases.
A rule is one measure beyond a threshold, or either of two (``--max-tests 1``: one
only). Printed:

- the flags the results carry now (thresholds set before any out-of-fold measurement);
- nested cross-validation: for each fold, the rule chosen on the other folds alone, and
  what it flags in the fold it never saw; the pooled count is the honest estimate;
- the rule chosen on all the folds, which is what the product would ship.

The flags for patterns these cases may not show (``rim``, ``implausible_volume``,
``brain_mask``) stay in every rule; the chosen rule stands for the rest (the product
ships ``task_agreement < TASK_AGREEMENT`` (``model/inference/lesions.py``) as
``task_disagreement``, chosen here with ``--max-tests 1 --measures task_agreement``;
``low_confidence``, a threshold on ``confidence``, and before it ``large_removal``,
post-processing removing a quarter of the prediction, were flags before it).
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FIXED = ("rim", "implausible_volume", "brain_mask")
#: A failure: a result whose WT Dice is below this.
FAILURE_WT = 0.70
#: The share of good results a rule may flag (the issue's bound: one in ten).
MAX_FALSE_ALARMS = 0.10
#: Measures a rule may use (derived ratios included).
MEASURES = (
    "rim_fraction",
    "removed_fraction",
    "uncertain_fraction",
    "confidence",
    "task_agreement",
    "components",
    "wt_ml",
    "tc_ratio",
    "et_ratio",
)


@dataclass(frozen=True)
class Test:
    measure: str
    above: bool  # flag when the measure is above the threshold (else below)
    threshold: float

    def __call__(self, values: dict[str, float]) -> bool:
        value = values.get(self.measure)
        if value is None:
            return False
        return value > self.threshold if self.above else value < self.threshold

    def __str__(self) -> str:
        return f"{self.measure} {'>' if self.above else '<'} {self.threshold:.3g}"


Rule = tuple[Test, ...]


def load(paths: list[Path], setting: str) -> dict[str, dict[str, Any]]:
    """Case -> its WT Dice, fold, flags and measures (with the derived ratios)."""
    cases: dict[str, dict[str, Any]] = {}
    for path in paths:
        document = json.loads(path.read_text())
        if setting not in document["results"]:
            raise SystemExit(f"{path}: no {setting!r}; it has {sorted(document['results'])}")
        result = document["results"][setting]
        for name, scores in result["per_case"].items():
            measures = dict(result.get("quality_measures", {}).get(name, {}))
            if not measures:
                raise SystemExit(f"{path}: {name} has no quality measures; rerun accuracy.py")
            wt, tc = measures.get("wt_ml", 0.0), measures.get("tc_ml", 0.0)
            measures["tc_ratio"] = tc / wt if wt else 0.0
            measures["et_ratio"] = measures.get("et_ml", 0.0) / tc if tc else 0.0
            cases[name] = {
                "wt": float(scores["WT"]["dice"] or 0.0),
                "fold": document.get("folds", {}).get(name, "?"),
                "flags": list(result["flags"].get(name, [])),
                "measures": measures,
            }
    return cases


def flagged(rule: Rule, case: dict[str, Any]) -> bool:
    fixed = any(f in FIXED for f in case["flags"])
    return fixed or any(test(case["measures"]) for test in rule)


def score(rule: Rule, cases: list[dict[str, Any]], failure: float) -> tuple[int, int, int, int]:
    """(failures flagged, failures, others flagged, others)."""
    bad = [c for c in cases if c["wt"] < failure]
    good = [c for c in cases if c["wt"] >= failure]
    return (
        sum(flagged(rule, c) for c in bad),
        len(bad),
        sum(flagged(rule, c) for c in good),
        len(good),
    )


def candidate_tests(
    cases: list[dict[str, Any]], measures: tuple[str, ...] = MEASURES
) -> list[Test]:
    """Every measure, both directions, thresholds halfway between neighbouring values."""
    tests = []
    for measure in measures:
        values = sorted({c["measures"][measure] for c in cases if measure in c["measures"]})
        cuts = [(a + b) / 2 for a, b in itertools.pairwise(values)]
        tests += [Test(measure, above, cut) for cut in cuts for above in (True, False)]
    return tests


def choose(
    cases: list[dict[str, Any]],
    failure: float,
    max_false: float,
    max_tests: int = 2,
    measures: tuple[str, ...] = MEASURES,
) -> Rule:
    """The rule of at most ``max_tests`` (1 or 2) tests that flags the most failures with
    at most ``max_false`` of the others flagged; ties go to fewer false alarms, then to
    one test rather than two."""
    good = [c for c in cases if c["wt"] >= failure]
    bad = [c for c in cases if c["wt"] < failure]
    tests = candidate_tests(cases, measures)
    hits = {t: np.array([t(c["measures"]) for c in bad], bool) for t in tests}
    alarms = {t: np.array([t(c["measures"]) for c in good], bool) for t in tests}
    allowed = int(np.floor(max_false * len(good)))
    best: tuple[tuple[int, int, int], Rule] = ((0, 0, 0), ())
    singles = [t for t in tests if alarms[t].sum() <= allowed and hits[t].any()]
    pairs = list(itertools.combinations(singles, 2)) if max_tests > 1 else []
    for rule in [(t,) for t in singles] + pairs:
        caught = np.logical_or.reduce([hits[t] for t in rule]).sum()
        false = np.logical_or.reduce([alarms[t] for t in rule]).sum()
        if false > allowed:
            continue
        key = (int(caught), -int(false), -len(rule))
        if key > best[0]:
            best = (key, rule)
    return best[1]


Counts = tuple[int, int, int, int]


def nested_folds(
    cases: dict[str, dict[str, Any]],
    failure: float,
    max_false: float,
    max_tests: int = 2,
    measures: tuple[str, ...] = MEASURES,
) -> dict[str, tuple[Rule, Counts]]:
    """Fold -> the rule chosen on the other folds alone, and its counts on this fold."""
    everything = list(cases.values())
    out = {}
    for fold in sorted({c["fold"] for c in everything}):
        rest = [c for c in everything if c["fold"] != fold]
        held = [c for c in everything if c["fold"] == fold]
        rule = choose(rest, failure, max_false, max_tests, measures)
        out[fold] = (rule, score(rule, held, failure))
    return out


def pooled(folds: dict[str, tuple[Rule, Counts]]) -> Counts:
    """The counts of :func:`nested_folds` added over the folds: the honest estimate of
    what a rule chosen this way flags on cases that did not choose it."""
    return tuple(sum(counts[i] for _, counts in folds.values()) for i in range(4))  # type: ignore[return-value]


def describe(rule: Rule) -> str:
    return " or ".join(str(t) for t in rule) or "(none beyond the fixed flags)"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("documents", nargs="+", type=Path)
    parser.add_argument("--setting", default="oof/wide+lesion+guard+mirror+noshell+joint")
    parser.add_argument("--failure", type=float, default=FAILURE_WT)
    parser.add_argument("--max-false-alarms", type=float, default=MAX_FALSE_ALARMS)
    parser.add_argument("--max-tests", type=int, choices=(1, 2), default=2)
    parser.add_argument(
        "--measures",
        nargs="+",
        choices=MEASURES,
        default=MEASURES,
        help="the measures a rule may use",
    )
    args = parser.parse_args()
    cases = load(args.documents, args.setting)
    everything = list(cases.values())

    def line(label: str, counts: tuple[int, int, int, int]) -> str:
        return (
            f"{label:<34} failures flagged {counts[0]} of {counts[1]}, "
            f"others flagged {counts[2]} of {counts[3]}"
        )

    now = sum(bool(c["flags"]) for c in everything if c["wt"] < args.failure)
    bad = sum(c["wt"] < args.failure for c in everything)
    alarms = sum(bool(c["flags"]) for c in everything if c["wt"] >= args.failure)
    print(f"{len(cases)} cases, {bad} below WT {args.failure}")
    print(line("flags as they are", (now, bad, alarms, len(cases) - bad)))

    measures = tuple(args.measures)
    folds = nested_folds(cases, args.failure, args.max_false_alarms, args.max_tests, measures)
    for fold, (rule, counts) in folds.items():
        print(line(f"{fold} (rule of the other folds)", counts) + f": {describe(rule)}")
    print(line("nested, pooled", pooled(folds)))

    rule = choose(everything, args.failure, args.max_false_alarms, args.max_tests, measures)
    print(line("chosen on all folds", score(rule, everything, args.failure)))
    print(f"  rule: {describe(rule)}")
    for name, case in sorted(cases.items(), key=lambda kv: kv[1]["wt"]):
        if case["wt"] < args.failure or flagged(rule, case):
            mark = "flagged" if flagged(rule, case) else "missed"
            print(f"  {name:<26} WT {case['wt']:.3f} {mark}")


if __name__ == "__main__":
    main()
