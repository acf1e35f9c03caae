"""The ``omnet`` command line: batch segmentation, evaluation, training and serving.

Every sub-command reports failures as one readable line on stderr and a non-zero exit
status; tracebacks are shown only with ``--debug``.

Sub-commands import the science (``model``, and with it PyTorch) inside their handlers,
so that ``omnet --help`` and a usage error stay fast.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from service import export_command, serve, train_command

if TYPE_CHECKING:
    from model.metrics import RegionMetrics
    from model.pipeline import SegmentationOptions
    from model.tiling import Predictor

logger = logging.getLogger(__name__)

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CommandError(Exception):
    """A failure to report to the user as one line."""


Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help_text: str, configure: Callable[[argparse.ArgumentParser], None]):
    def register(handler: Handler) -> Handler:
        _COMMANDS[name] = (help_text, configure, handler)
        return handler

    return register


class _LazyChoices:
    """The ``choices`` of an option, read from a module attribute on first use.

    Building the parser then imports nothing heavy: the module is only imported when
    an option value is checked or the sub-command's help is shown. Options using it
    need an explicit ``metavar`` (argparse lists the choices in usage otherwise).
    """

    def __init__(self, module: str, attribute: str) -> None:
        self._module = module
        self._attribute = attribute

    def _values(self) -> tuple[str, ...]:
        return tuple(getattr(importlib.import_module(self._module), self._attribute))

    def __contains__(self, value: object) -> bool:
        return value in self._values()

    def __iter__(self) -> Iterator[str]:
        return iter(self._values())


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _one_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _nifti_stem(path: Path) -> str | None:
    """``path``'s name without ``.nii.gz`` / ``.nii``; None for a non-NIfTI name."""
    lower = path.name.lower()
    for ext in (".nii.gz", ".nii"):
        if lower.endswith(ext) and len(lower) > len(ext):
            return path.name[: -len(ext)]
    return None


def _has_nifti(folder: Path) -> bool:
    return any(
        p.is_file() and not p.name.startswith(".") and _nifti_stem(p) is not None
        for p in folder.iterdir()
    )


# --------------------------------------------------------------------------- model-info
def _configure_model_info(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--variant",
        default="omnet_cga",
        choices=_LazyChoices("model.network", "VARIANTS"),
        metavar="VARIANT",
        help="architecture: %(choices)s (default %(default)s)",
    )
    p.add_argument("--width", type=int, default=32, help="base width (32 in the paper)")
    p.add_argument("--classes", type=int, default=5, help="classes of a single 'mc' network")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


@command("model-info", "parameter count and FLOPs of an architecture", _configure_model_info)
def _model_info(args: argparse.Namespace) -> int:
    from model.network import ArchConfig, build_model, count_flops, count_parameters

    config = ArchConfig(variant=args.variant, width=args.width, num_classes=args.classes)
    model = build_model(config)
    info: dict[str, Any] = {
        "variant": config.variant,
        "width": config.width,
        "parameters": count_parameters(model),
        "flops_per_patch": count_flops(model),
        "patch": [32, 32, 16],
    }
    if args.json:
        print(json.dumps(info))
    else:
        print(f"variant     {info['variant']} (width {info['width']})")
        print(f"parameters  {info['parameters']:,} ({info['parameters'] / 1e6:.3f} M)")
        print(f"FLOPs       {info['flops_per_patch'] / 1e9:.2f} G per 32x32x16 patch")
    return 0


# --------------------------------------------------------------------------- phantom
def _configure_phantom(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="parent folder; the case goes to OUT/NAME/")
    p.add_argument("--name", default="phantom", help="case name (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="grid size in voxels, each at least 16 (default 64 64 40)",
    )


@command(
    "phantom",
    "write a synthetic BraTS-like case (four modalities and its label map)",
    _configure_phantom,
)
def _phantom(args: argparse.Namespace) -> int:
    from model.phantom import write_phantom

    kwargs: dict[str, object] = {"seed": args.seed}
    if args.shape is not None:
        kwargs["shape"] = tuple(args.shape)
    paths = write_phantom(args.out, name=args.name, **kwargs)
    for path in paths.values():
        print(path)
    return 0


# --------------------------------------------------------------------------- segment
#: Where the bundled model is installed, relative to the ``model`` package.

#: Command-line spelling of the four modality options; also load_case's mapping keys.
_MODALITY_OPTIONS = ("t1", "t1ce", "t2", "flair")


def bundled_checkpoint_path() -> Path:
    """Where the bundled model lives when installed: ``model/weights/omnet_cga.pt``."""
    from model import weights

    return Path(weights.__file__).resolve().parent / weights.BUNDLED_NAME


def default_checkpoint() -> Path:
    """The bundled model's checkpoint.

    Raises:
        CommandError: no bundled model is installed.
    """
    path = bundled_checkpoint_path()
    if not path.is_file():
        raise CommandError(
            f"no bundled model is installed (no {path}); pass --checkpoint PATH with a "
            "trained omnet checkpoint (.pt)"
        )
    return path


@dataclass(frozen=True)
class _CaseInput:
    """One case to segment.

    Attributes:
        name: the case name (output file prefix); None: load_case derives it.
        source: what :func:`model.nifti_io.load_case` reads.
        folder: the BraTS case folder, where ``--evaluate`` looks for a label map.
    """

    name: str | None
    source: Path | dict[str, Path]
    folder: Path | None = None

    @property
    def label(self) -> str:
        if self.name is not None:
            return self.name
        return str(self.source if isinstance(self.source, Path) else self.source["t1"])


def _configure_segment(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "inputs:\n"
        "  a case folder (BraTS names <case>_t1, _t1ce, _t2, _flair or <case>-t1n, -t1c,\n"
        "  -t2w, -t2f, .nii or .nii.gz), a folder of such case folders, a 4D file\n"
        "  (X, Y, Z, 4) holding T1, T1ce, T2, FLAIR, or the four files given with\n"
        "  --t1 --t1ce --t2 --flair instead of INPUT.\n\n"
        "outputs, per case, in --out:\n"
        "  <case>_seg.nii.gz            labels on the input's grid (uint8)\n"
        "  <case>_metrics.json          region volumes (mL), timings, evaluation\n"
        "  <case>_probabilities.nii.gz  with --probabilities: (X, Y, Z, 4) background,\n"
        "                               NCR/NET, edema, ET\n"
        "  <case>_preview.png           with --preview: FLAIR with the labels\n\n"
        "One line per case goes to stdout, progress bars and errors to stderr. When\n"
        "several cases are given, a case that fails is reported on one line and the\n"
        "others go on; the exit status is then 1."
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="case folder(s) or 4D file(s)")
    for modality in _MODALITY_OPTIONS:
        p.add_argument(f"--{modality}", metavar="FILE", help=f"the {modality} file of one case")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument(
        "--checkpoint",
        action="append",
        metavar="PATH",
        help="model checkpoint; repeat for an ensemble (default: the bundled model)",
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument(
        "--tiling",
        default="paper",
        choices=_LazyChoices("model.tiling", "TILINGS"),
        metavar="NAME",
        help="paper (32x32x16 patches, default) or fast (64x64x32 patches)",
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=16, help="patches per forward pass (16)"
    )
    p.add_argument(
        "--no-postprocess",
        action="store_true",
        help="skip small-component removal and edema relabelling",
    )
    p.add_argument(
        "--probabilities", action="store_true", help="also write the class probabilities"
    )
    p.add_argument("--preview", action="store_true", help="also write a PNG preview")
    p.add_argument(
        "--label-convention",
        type=int,
        choices=(4, 3),
        default=4,
        help="label of the enhancing tumour: 4 (BraTS 2018-2021, default) or 3 (BraTS 2023)",
    )
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="compare with the case folder's label map (<case>_seg) when it has one",
    )


def _folder_inputs(folder: Path, out_dir: Path) -> list[_CaseInput]:
    """A case folder, or the case folders inside a folder of cases."""
    if _has_nifti(folder):
        return [_CaseInput(folder.name, folder, folder)]
    out = out_dir.resolve()
    # Sub-folders with NIfTI files but not all four modalities are kept, so that
    # loading reports what they lack instead of skipping them silently.
    cases = sorted(
        p
        for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.resolve() != out and _has_nifti(p)
    )
    if not cases:
        raise CommandError(
            f"folder {folder} holds neither the NIfTI files of a case nor case folders with them"
        )
    return [_CaseInput(p.name, p, p) for p in cases]


def _segment_inputs(args: argparse.Namespace, out_dir: Path) -> list[_CaseInput]:
    """The cases named on the command line, checked for usage errors."""
    given = {m: getattr(args, m) for m in _MODALITY_OPTIONS if getattr(args, m) is not None}
    if given:
        if args.inputs:
            raise CommandError(
                "give either INPUT paths or the four files --t1 --t1ce --t2 --flair, not both"
            )
        missing = [f"--{m}" for m in _MODALITY_OPTIONS if m not in given]
        if missing:
            raise CommandError(
                f"the four-file form needs --t1, --t1ce, --t2 and --flair; missing "
                f"{', '.join(missing)}"
            )
        return [_CaseInput(None, {m: Path(p) for m, p in given.items()})]
    if not args.inputs:
        raise CommandError(
            "no input: give a case folder, a folder of case folders, a 4D NIfTI file, or "
            "--t1 --t1ce --t2 --flair"
        )
    jobs: list[_CaseInput] = []
    for raw in args.inputs:
        path = Path(raw)
        if path.is_dir():
            jobs.extend(_folder_inputs(path, out_dir))
        elif path.exists():
            jobs.append(_CaseInput(_nifti_stem(path) or path.name, path))
        else:
            raise CommandError(
                f"input {path} does not exist; give a case folder, a folder of case "
                "folders or a 4D NIfTI file"
            )
    seen: dict[str, _CaseInput] = {}
    for job in jobs:
        if job.folder is not None and job.folder.resolve() == out_dir.resolve():
            raise CommandError(
                f"--out {out_dir} is the case folder itself: {job.label}_seg.nii.gz would "
                "overwrite its label map; choose another output folder"
            )
        if job.label in seen:
            raise CommandError(
                f"two inputs are both case {job.label!r} ({seen[job.label].source} and "
                f"{job.source}); their outputs would overwrite each other"
            )
        seen[job.label] = job
    return jobs


class _TileProgress:
    """A tqdm bar over the tiles of one case (on stderr, off when it is not a terminal)."""

    def __init__(self, name: str) -> None:
        from tqdm import tqdm

        self.tiles = 0
        self._bar = tqdm(desc=name, unit="tile", file=sys.stderr, disable=None, leave=False)

    def __call__(self, done: int, total: int) -> None:
        if self._bar.total != total:
            self._bar.reset(total=total)
        self._bar.update(done - self._bar.n)
        self.tiles = total

    def close(self) -> None:
        self._bar.close()


def _checkpoint_info(loaded: Sequence[Any]) -> list[dict[str, Any]]:
    return [
        {
            "path": str(c.path),
            "sha256": c.sha256,
            "variant": c.config.variant,
            "width": c.config.width,
        }
        for c in loaded
    ]


def _segment_one(
    job: _CaseInput,
    predictor: Predictor,
    options: SegmentationOptions,
    args: argparse.Namespace,
    out_dir: Path,
    run_info: Mapping[str, Any],
) -> str:
    """Segments one case, writes its outputs and returns its one-line summary."""
    from model.labels import ENHANCING
    from model.metrics import evaluate_case, region_volumes_ml
    from model.nifti_io import (
        find_label_file,
        load_case,
        load_labels,
    )
    from model.pipeline import segment_case, write_segmentation

    start = time.perf_counter()
    case = load_case(job.source, name=job.name)
    reference_path = find_label_file(job.folder) if args.evaluate and job.folder else None
    # Read the reference before the long inference, so that a bad one fails early.
    reference = load_labels(reference_path, like=case) if reference_path else None
    timings = {"load": time.perf_counter() - start}

    progress = _TileProgress(case.name)
    try:
        seg = segment_case(case, predictor, options, progress)
    finally:
        progress.close()
    timings.update(seg.timings)

    evaluation: dict[str, Any] | None = None
    if reference is not None:
        tick = time.perf_counter()
        scores = evaluate_case(seg.labels, reference, case.spacing, ENHANCING, ENHANCING)
        evaluation = {
            "reference": str(reference_path),
            "metrics": {region: m.to_dict() for region, m in scores.items()},
        }
        timings["evaluate"] = time.perf_counter() - tick

    tick = time.perf_counter()
    written = write_segmentation(
        seg,
        case,
        out_dir / f"{case.name}_seg.nii.gz",
        out_dir / f"{case.name}_probabilities.nii.gz",
        out_dir / f"{case.name}_preview.png" if args.preview else None,
        args.label_convention,
    )
    outputs = {"labels" if k == "segmentation" else k: p for k, p in written.items()}
    timings["write"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - start

    volumes = region_volumes_ml(seg.labels, case.spacing, ENHANCING)
    report: dict[str, Any] = {
        "case": case.name,
        "inputs": {m: str(p) for m, p in case.sources.items()},
        "outputs": {kind: str(p) for kind, p in outputs.items()},
        "shape": list(case.shape),
        "spacing_mm": list(case.spacing),
        "et_label": args.label_convention,
        "volumes_ml": volumes,
        "tiles": progress.tiles,
        **run_info,
        "timings_s": timings,
    }
    if args.evaluate:
        report["evaluation"] = evaluation  # null: the case has no label map
    (out_dir / f"{case.name}_metrics.json").write_text(json.dumps(report, indent=2) + "\n")

    line = (
        f"{case.name}: WT {volumes['WT']:.1f} mL, TC {volumes['TC']:.1f} mL, "
        f"ET {volumes['ET']:.1f} mL; {progress.tiles} tile{'' if progress.tiles == 1 else 's'}, "
        f"{timings['total']:.1f} s"
    )
    if evaluation is not None:
        dice = "  ".join(f"{region} {m['dice']:.3f}" for region, m in evaluation["metrics"].items())
        line += f"; Dice {dice}"
    elif args.evaluate:
        line += "; not evaluated (no label map found for it)"
    return f"{line} -> {outputs['labels']}"


@command("segment", "segment cases with a trained model", _configure_segment)
def _segment(args: argparse.Namespace) -> int:
    from model.pipeline import SegmentationOptions, load_predictor
    from model.tiling import TILINGS

    out_dir = Path(args.out)
    jobs = _segment_inputs(args, out_dir)
    checkpoints = args.checkpoint or [default_checkpoint()]
    predictor, loaded = load_predictor(
        checkpoints, args.device, args.batch_size, TILINGS[args.tiling]
    )
    options = SegmentationOptions(
        remove_small=not args.no_postprocess,
        relabel_edema=not args.no_postprocess,
        probabilities=args.probabilities,
    )
    run_info = {
        "tiling": args.tiling,
        "device": str(predictor.device),
        "batch_size": args.batch_size,
        "postprocess": not args.no_postprocess,
        "checkpoints": _checkpoint_info(loaded),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    for job in jobs:
        try:
            line = _segment_one(job, predictor, options, args, out_dir, run_info)
        except Exception as exc:
            if len(jobs) == 1 or args.debug:
                raise
            failed.append(job.label)
            print(f"omnet segment: {job.label}: error: {_one_line(exc)}", file=sys.stderr)
            continue
        print(line, flush=True)
    if failed:
        raise CommandError(f"{len(failed)} of {len(jobs)} cases failed: {', '.join(failed)}")
    return 0


# --------------------------------------------------------------------------- evaluate
_LABEL_SUFFIXES = ("_seg", "-seg")
_PROBABILITIES_SUFFIX = "_probabilities"
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
  named <case>_seg (or <case>-seg), .nii or .nii.gz, only those count; otherwise
  every <case>.nii(.gz) does, except <case>_probabilities files. REF may also hold
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


def _configure_evaluate(p: argparse.ArgumentParser) -> None:
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


def _strip_label_suffix(stem: str) -> str:
    for suffix in _LABEL_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def _flat_label_files(folder: Path) -> dict[str, Path]:
    """Label files directly inside ``folder`` by case name (rule in the help)."""
    stems = {
        p: stem
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and (stem := _nifti_stem(p)) is not None
    }
    seg = [p for p, stem in stems.items() if _strip_label_suffix(stem) != stem]
    chosen = seg or [p for p, s in stems.items() if not s.endswith(_PROBABILITIES_SUFFIX)]
    files: dict[str, Path] = {}
    for path in chosen:
        name = _strip_label_suffix(stems[path])
        if name in files:
            raise CommandError(
                f"folder {folder} has two label files for case {name}: "
                f"{files[name].name} and {path.name}; keep one"
            )
        files[name] = path
    return files


def _reference_files(folder: Path) -> dict[str, Path]:
    """Flat reference files and BraTS case folders' label maps, by case name."""
    from model.nifti_io import find_label_file

    files = _flat_label_files(folder)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = find_label_file(sub)
        if label is None:
            continue
        if sub.name in files:
            raise CommandError(
                f"folder {folder} has two references for case {sub.name}: "
                f"{files[sub.name].name} and {label}; keep one"
            )
        files[sub.name] = label
    return files


def _pairs(pred: Path, ref: Path) -> tuple[dict[str, tuple[Path, Path]], list[str]]:
    """Matched (prediction, reference) files by case name, and the unmatched-case errors."""
    from model.nifti_io import find_label_file

    for path, what in ((pred, "prediction"), (ref, "reference")):
        if not path.exists():
            raise CommandError(f"{what} {path} does not exist")
    if pred.is_file():
        if ref.is_dir():
            label = find_label_file(ref)
            if label is None:
                raise CommandError(
                    f"reference folder {ref} has no label map <case>_seg.nii.gz; give the "
                    "reference label file, or two folders"
                )
            ref = label
        name = _strip_label_suffix(_nifti_stem(pred) or pred.name)
        return {name: (pred, ref)}, []
    if ref.is_file():
        raise CommandError(
            f"prediction {pred} is a folder but reference {ref} is a file; give two files "
            "or two folders"
        )
    preds = _flat_label_files(pred)
    if not preds:
        raise CommandError(f"prediction folder {pred} holds no NIfTI label files")
    refs = _reference_files(ref)
    errors = []
    for names, message in (
        (sorted(set(preds) - set(refs)), f"no reference in {ref} for"),
        (sorted(set(refs) - set(preds)), f"no prediction in {pred} for"),
    ):
        if names:
            shown = ", ".join(names[:10]) + (
                f" and {len(names) - 10} more" if len(names) > 10 else ""
            )
            errors.append(f"{message} {len(names)} case(s): {shown}")
    pairs = {name: (preds[name], refs[name]) for name in sorted(set(preds) & set(refs))}
    return pairs, errors


def _evaluate_files(pred: Path, ref: Path) -> dict[str, RegionMetrics]:
    """Evaluates one prediction file against one reference file on the reference's grid."""
    import nibabel as nib
    import numpy as np

    from model.labels import ENHANCING
    from model.metrics import evaluate_case
    from model.nifti_io import AFFINE_ATOL, load_labels

    ref_labels = load_labels(ref)
    pred_labels = load_labels(pred)
    if pred_labels.shape != ref_labels.shape:
        raise CommandError(
            f"prediction {pred} has shape {pred_labels.shape} but reference {ref} has "
            f"{ref_labels.shape}; both must be on the same voxel grid"
        )
    # Headers only (nibabel reads voxel data lazily); load_labels checked both are NIfTI.
    ref_img = cast(nib.Nifti1Image, nib.load(ref))
    pred_img = cast(nib.Nifti1Image, nib.load(pred))
    diff = float(np.max(np.abs(pred_img.affine - ref_img.affine)))
    if diff > AFFINE_ATOL:
        raise CommandError(
            f"prediction {pred} and reference {ref} have different affines (largest "
            f"difference {diff:.4g} mm); they are not on the same grid"
        )
    spacing = tuple(float(z) for z in ref_img.header.get_zooms()[:3])
    return evaluate_case(pred_labels, ref_labels, spacing, ENHANCING, ENHANCING)


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

    from model.metrics import RegionMetrics

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


@command(
    "evaluate",
    "Dice, sensitivity, specificity, PPV and HD95 of predicted label maps",
    _configure_evaluate,
)
def _evaluate(args: argparse.Namespace) -> int:
    from model.metrics import summarise

    pairs, errors = _pairs(Path(args.pred), Path(args.ref))
    for message in errors:
        print(f"omnet evaluate: error: {message}", file=sys.stderr)
    results: dict[str, dict[str, RegionMetrics]] = {}
    for name, (pred, ref) in pairs.items():
        try:
            results[name] = _evaluate_files(pred, ref)
        except Exception as exc:
            if len(pairs) == 1 or args.debug:
                raise
            errors.append(name)
            print(f"omnet evaluate: {name}: error: {_one_line(exc)}", file=sys.stderr)
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
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, newline="")
    else:
        sys.stdout.write(text)
    return EXIT_FAILURE if errors else 0


command("train", "train OM-Net on a folder of BraTS cases (resumable)", train_command.configure)(
    train_command.run
)
command("serve", "run the HTTP API and one worker", serve.configure_serve)(serve.serve)
command("worker", "run a segmentation worker (Celery)", serve.configure_worker)(serve.worker)
command(
    "export", "write a compact (half-precision) copy of a checkpoint", export_command.configure
)(export_command.run)


# --------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnet", description="OM-Net + CGA brain-tumour segmentation"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, configure, handler) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("omnet: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place that turns any failure into one line
        if args.debug:
            raise
        print(f"omnet {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
