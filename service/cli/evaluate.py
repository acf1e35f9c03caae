"""``omnet evaluate``: Dice, sensitivity, specificity, PPV and HD95 of label maps.

The rules that pair predictions with references live in :mod:`model.evaluation.files`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from service.cli.common import EXIT_FAILURE, CommandError, one_line

if TYPE_CHECKING:
    from model.evaluation.metrics import RegionMetrics

NAME = "evaluate"
HELP = "Dice, sensitivity, specificity, PPV and HD95 of predicted label maps"

_METRIC_HEADINGS = {
    "dice": "Dice",
    "sensitivity": "sens",
    "specificity": "spec",
    "ppv": "PPV",
    "hd95": "HD95 mm",
}

_EVALUATE_EPILOG = """\
matching (PRED and REF both folders):
  A folder's label files are the NIfTI files directly inside it. When some are
  named <case>_seg (or <case>-seg), .nii, .nii.gz or .nii.bz2, only those count;
  otherwise every <case>.nii(.gz, .bz2) does, except <case>_probabilities files. REF may also hold
  BraTS case folders: REF/<case>/ with its label map <case>_seg.nii.gz. A
  prediction and a reference match when their case names are equal (exact,
  case-sensitive). Cases found on one side only are reported as errors (exit
  status 1); the matched ones are still evaluated.

  PRED a file and REF a BraTS case folder evaluates against that folder's label
  map. Spacing (for HD95 and volumes) comes from the reference's header.

formats:
  table  aligned columns, one row per case and region, then the mean over cases
  json   {"cases": {case: {"prediction", "reference", "metrics": {region:
         {metric: value}}}}, "mean": {region: {metric: value}}, "n_cases": n}
  csv    one row per case and region (no mean rows); undefined values are empty"""


def configure(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EVALUATE_EPILOG
    p.add_argument("pred", metavar="PRED", help="predicted label file, or a folder of them")
    p.add_argument(
        "ref", metavar="REF", help="reference label file, or a folder (see matching below)"
    )
    p.add_argument(
        "--format", choices=("table", "json", "csv"), default="table", help="(default table)"
    )
    p.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of stdout")


def _format_value(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _evaluation_table(
    results: Mapping[str, Mapping[str, RegionMetrics]],
    mean: Mapping[str, Mapping[str, float | None]],
) -> str:
    rows = [
        (name, region, *(getattr(m, key) for key in _METRIC_HEADINGS))
        for name, per_region in results.items()
        for region, m in per_region.items()
    ]
    mean_label = f"mean (n={len(results)})"
    rows += [
        (mean_label, region, *(values[key] for key in _METRIC_HEADINGS))
        for region, values in mean.items()
    ]
    width = max(len("case"), *(len(str(r[0])) for r in rows))
    header = f"{'case':<{width}}  region" + "".join(f"{h:>9}" for h in _METRIC_HEADINGS.values())
    lines = [header]
    for name, region, *values in rows:
        cells = [_format_value(v, 4) for v in values[:-1]] + [_format_value(values[-1], 2)]
        lines.append(f"{name:<{width}}  {region:<6}" + "".join(f"{c:>9}" for c in cells))
    return "\n".join(lines) + "\n"


def _evaluation_csv(results: Mapping[str, Mapping[str, RegionMetrics]]) -> str:
    from dataclasses import fields

    from model.evaluation.metrics import RegionMetrics

    names = [f.name for f in fields(RegionMetrics)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "region", *names])
    for case, per_region in results.items():
        for region, m in per_region.items():
            values = m.to_dict()
            writer.writerow(
                [case, region, *("" if values[n] is None else values[n] for n in names)]
            )
    return buffer.getvalue()


def run(args: argparse.Namespace) -> int:
    from model.evaluation.files import evaluate_label_files, match_label_files
    from model.evaluation.metrics import summarise

    pairs, errors = match_label_files(Path(args.pred), Path(args.ref))
    for message in errors:
        print(f"omnet evaluate: error: {message}", file=sys.stderr)
    results: dict[str, dict[str, RegionMetrics]] = {}
    for name, (pred, ref) in pairs.items():
        try:
            results[name] = evaluate_label_files(pred, ref)
        except Exception as exc:
            if len(pairs) == 1 or args.debug:
                raise
            errors.append(name)
            print(f"omnet evaluate: {name}: error: {one_line(exc)}", file=sys.stderr)
    if not results:
        raise CommandError("no case could be evaluated")

    mean = summarise(results)
    if args.format == "json":
        document = {
            "cases": {
                name: {
                    "prediction": str(pairs[name][0]),
                    "reference": str(pairs[name][1]),
                    "metrics": {region: m.to_dict() for region, m in per_region.items()},
                }
                for name, per_region in results.items()
            },
            "mean": mean,
            "n_cases": len(results),
        }
        text = json.dumps(document, indent=2) + "\n"
    elif args.format == "csv":
        text = _evaluation_csv(results)
    else:
        text = _evaluation_table(results, mean)
    if args.output:
        from model.atomic import atomic_write_text

        atomic_write_text(args.output, text)
    else:
        sys.stdout.write(text)
    return EXIT_FAILURE if errors else 0
