"""``omnet segment``: segment cases with a trained model.

Each case goes through :func:`model.inference.case.process_case`, the path the service's workers
take too; this module adds what is the command line's own: reading its arguments into
cases, a progress bar, a one-line summary per case, and the case's report written as
``<case>_metrics.json`` (:mod:`model.inference.report`, the shape the API serves).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from model.defaults import (
    DEFAULT_FUSION,
    DEFAULT_POSTPROCESS,
    DEFAULT_PRECISION,
    DEFAULT_TILING,
    DEFAULT_TTA,
    FUSION_RULES,
    NO_POSTPROCESS,
    POSTPROCESS_MODES,
    PRECISIONS,
    TILING_NAMES,
    TTA_MODES,
    describe_fusion,
    describe_postprocess,
    describe_tta,
)
from service.cli.common import CommandError, one_line, positive_int, tiling_name

if TYPE_CHECKING:
    from model.inference.pipeline import SegmentationOptions
    from model.inference.report import CaseReport, InferenceInfo
    from model.inference.tiling import Predictor
    from model.io.dicom.study import DicomStudy
    from model.io.volumes import Case

NAME = "segment"
HELP = "segment cases with a trained model"


#: Command-line spelling of the four modality options; also load_case's mapping keys.
MODALITY_OPTIONS = ("t1", "t1ce", "t2", "flair")


def _has_nifti(folder: Path) -> bool:
    from model.io.nifti.files import nifti_stem

    return any(
        p.is_file() and not p.name.startswith(".") and nifti_stem(p) is not None
        for p in folder.iterdir()
    )


def default_checkpoint() -> Path:
    """The bundled model's checkpoint.

    Raises:
        CommandError: no bundled model is installed.
    """
    from model.weights import BUNDLED_PATH, bundled_checkpoint

    path = bundled_checkpoint()
    if path is None:
        raise CommandError(
            f"no bundled model is installed (no {BUNDLED_PATH}); pass --checkpoint PATH "
            "with a trained omnet checkpoint (.pt)"
        )
    return path


@dataclass(frozen=True)
class _CaseInput:
    """One case to segment.

    Attributes:
        name: the case name (output file prefix); None: load_case derives it.
        source: what :func:`model.io.nifti.read.load_case` reads, or a DICOM study.
        folder: the BraTS case folder, where ``--evaluate`` looks for a label map.
        dicom: ``source`` is a DICOM study (a folder or zip file).
    """

    name: str | None
    source: Path | dict[str, Path]
    folder: Path | None = None
    dicom: bool = False

    @property
    def label(self) -> str:
        if self.name is not None:
            return self.name
        return str(self.source if isinstance(self.source, Path) else self.source["t1"])


def configure(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "inputs:\n"
        "  a case folder (BraTS names <case>_t1, _t1ce, _t2, _flair or <case>-t1n, -t1c,\n"
        "  -t2w, -t2f; .nii, .nii.gz or .nii.bz2), a folder of such case folders, a 4D file\n"
        "  (X, Y, Z, 4) holding T1, T1ce, T2, FLAIR, or the four files given with\n"
        "  --t1 --t1ce --t2 --flair instead of INPUT; or a DICOM study, a folder (searched\n"
        "  recursively) or zip file of its series: T1, T1ce, T2 and FLAIR are recognised by\n"
        "  their descriptions and sequences (name a series with --series t1ce=UID) and put\n"
        "  on the T1ce grid.\n\n"
        "outputs, per case, in --out:\n"
        "  <case>_seg.nii.gz            labels on the input's grid (uint8)\n"
        "  <case>_metrics.json          region volumes (mL), timings, evaluation\n"
        "  <case>_probabilities.nii.gz  with --probabilities: (X, Y, Z, 4) background,\n"
        "                               NCR/NET, edema, ET\n"
        "  <case>_preview.png           with --preview: FLAIR with the labels\n"
        "  <case>_seg.dcm               with --dicom-seg (DICOM input): DICOM SEG of the\n"
        "                               labels on the T1ce series\n"
        "  <case>_preview.dcm           with --dicom-seg and --preview: the preview as a\n"
        "                               DICOM Secondary Capture\n\n"
        "One line per case goes to stdout, progress bars and errors to stderr. When\n"
        "several cases are given, a case that fails is reported on one line and the\n"
        "others go on; the exit status is then 1."
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="case folder(s) or 4D file(s)")
    for modality in MODALITY_OPTIONS:
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
        default=DEFAULT_TILING,
        type=tiling_name,
        choices=TILING_NAMES,
        metavar="NAME",
        help="wide (default: 32x32x16 patches, centre 24x24x8 kept) or paper (centre "
        "20x20x5 kept, as the paper); see docs/method.md",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=16, help="patches per forward pass (16)"
    )
    p.add_argument(
        "--postprocess",
        choices=POSTPROCESS_MODES,
        default=DEFAULT_POSTPROCESS,
        help=describe_postprocess().replace("`", "").replace("%", "%%") + " (default %(default)s)",
    )
    p.add_argument(
        "--no-postprocess",
        action="store_const",
        const=NO_POSTPROCESS,
        dest="postprocess",
        help=f"same as --postprocess {NO_POSTPROCESS}",
    )
    p.add_argument(
        "--fusion",
        choices=FUSION_RULES,
        default=DEFAULT_FUSION,
        help="how the tasks' probabilities become labels: "
        + describe_fusion("").replace("%", "%%")
        + " (default %(default)s)",
    )
    p.add_argument(
        "--tta-mode",
        dest="tta",
        default=DEFAULT_TTA,
        choices=TTA_MODES,
        metavar="MODE",
        help=f"test-time augmentation: {describe_tta('')} (default {DEFAULT_TTA})",
    )
    p.add_argument(
        "--tta", dest="tta", action="store_const", const="all", help="same as --tta-mode all"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=DEFAULT_PRECISION,
        help="the network's arithmetic: auto (default: bfloat16 on CPUs with AVX512-BF16 or "
        "AMX, float16 on CUDA, float32 elsewhere), float32, or mixed (always half width)",
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
        "--dicom-seg",
        action="store_true",
        help="DICOM input: also write the labels as a DICOM SEG, <case>_seg.dcm",
    )
    p.add_argument(
        "--series",
        action="append",
        metavar="MOD=UID",
        help="DICOM input: the series to use for a modality (t1, t1ce, t2, flair), by "
        "SeriesInstanceUID or SeriesNumber; repeat for several",
    )
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="compare with the case folder's label map (<case>_seg) when it has one",
    )


def _folder_inputs(folder: Path, out_dir: Path) -> list[_CaseInput]:
    """A case folder, or the case folders inside a folder of cases."""
    from model.io.dicom.scan import looks_like_dicom

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
        if looks_like_dicom(folder):
            return [_CaseInput(folder.name, folder, dicom=True)]
        raise CommandError(
            f"folder {folder} holds neither the NIfTI files of a case, nor case folders with "
            "them, nor DICOM files"
        )
    return [_CaseInput(p.name, p, p) for p in cases]


def _segment_inputs(args: argparse.Namespace, out_dir: Path) -> list[_CaseInput]:
    """The cases named on the command line, checked for usage errors."""
    given = {m: getattr(args, m) for m in MODALITY_OPTIONS if getattr(args, m) is not None}
    if given:
        if args.inputs:
            raise CommandError(
                "give either INPUT paths or the four files --t1 --t1ce --t2 --flair, not both"
            )
        missing = [f"--{m}" for m in MODALITY_OPTIONS if m not in given]
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
        elif path.exists() and zipfile.is_zipfile(path):
            jobs.append(_CaseInput(_zip_stem(path), path, dicom=True))
        elif path.exists():
            jobs.append(_CaseInput(_file_stem(path), path))
        else:
            raise CommandError(
                f"input {path} does not exist; give a case folder, a folder of case "
                "folders or a 4D NIfTI file"
            )
    not_dicom = [job.label for job in jobs if not job.dicom]
    if args.dicom_seg and not_dicom:
        raise CommandError(
            f"--dicom-seg needs DICOM inputs (a SEG references its source series); "
            f"{not_dicom[0]} is NIfTI"
        )
    if args.series and (not_dicom or len(jobs) != 1):
        raise CommandError("--series names the series of one DICOM study: give exactly one")
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


def _zip_stem(path: Path) -> str:
    return path.name[: -len(".zip")] if path.name.lower().endswith(".zip") else path.stem


def _series_overrides(values: list[str] | None) -> dict[str, str]:
    """``--series MOD=UID`` values as a mapping."""
    from model.io.dicom.classify import parse_series_overrides

    try:
        return parse_series_overrides(values or [])
    except ValueError as exc:
        raise CommandError(f"--series: {exc}") from None


def _file_stem(path: Path) -> str:
    from model.io.nifti.files import nifti_stem

    return nifti_stem(path) or path.name


def _summary_line(report: CaseReport, evaluate: bool) -> str:
    volumes, tiles = report.volumes_ml, report.tiles
    line = (
        f"{report.case}: WT {volumes['WT']:.1f} mL, TC {volumes['TC']:.1f} mL, "
        f"ET {volumes['ET']:.1f} mL; {tiles} tile{'' if tiles == 1 else 's'}, "
        f"{report.timings_s['total']:.1f} s"
    )
    if report.evaluation is not None:
        dice = "  ".join(f"{region} {m.dice:.3f}" for region, m in report.evaluation.items())
        line += f"; Dice {dice}"
    elif evaluate:
        line += "; not evaluated (no label map found for it)"
    flags = report.quality.get("flags", [])
    line += f"; quality: review recommended ({', '.join(flags)})" if flags else "; quality: ok"
    return f"{line} -> {report.outputs['segmentation']}"


def _segment_one(
    job: _CaseInput,
    predictor: Predictor,
    options: SegmentationOptions,
    args: argparse.Namespace,
    out_dir: Path,
    inference: InferenceInfo,
) -> str:
    """Segments one case, writes its outputs and report; returns its one-line summary."""
    from model.atomic import atomic_write_text
    from model.inference.case import CaseOutputs, process_case
    from model.io.dicom.study import DicomStudy, read_dicom_study
    from model.io.nifti.files import find_label_file
    from model.io.nifti.read import load_case

    source: Case | DicomStudy
    started = time.perf_counter()
    if job.dicom:
        if not isinstance(job.source, Path):
            raise CommandError("a DICOM study is one folder or zip file")
        source = read_dicom_study(
            job.source, name=job.name, overrides=_series_overrides(args.series)
        )
        case = source.case
        for warning in source.warnings:
            print(f"omnet segment: {case.name}: warning: {warning}", file=sys.stderr)
        if args.dicom_seg:
            _check_dicom_outputs(source, args)
    else:
        source = case = load_case(job.source, name=job.name)
    read_s = time.perf_counter() - started
    reference = find_label_file(job.folder) if args.evaluate and job.folder else None
    outputs = CaseOutputs.in_folder(
        out_dir, case.name, args.probabilities, args.preview, dicom=job.dicom and args.dicom_seg
    )
    progress = _TileProgress(case.name)
    try:
        report = process_case(
            source,
            predictor,
            outputs,
            options,
            reference=reference,
            et_label=args.label_convention,
            progress=progress,
            inference=inference,
            read_s=read_s,
        )
    finally:
        progress.close()
    study_warnings = source.warnings if isinstance(source, DicomStudy) else []
    failures = set(report.failures.values())
    for warning in report.warnings:
        said = warning in study_warnings or any(warning.startswith(f) for f in failures)
        if not said:
            print(f"omnet segment: {case.name}: warning: {warning}", file=sys.stderr)
    document = report.to_dict()
    atomic_write_text(out_dir / f"{case.name}_metrics.json", json.dumps(document, indent=2) + "\n")
    if report.failures:
        print(_summary_line(report, args.evaluate), flush=True)
        raise CommandError(
            f"{'; '.join(report.failures.values())}; the NIfTI outputs and metrics of "
            f"{case.name} are kept in {out_dir}"
        )
    return _summary_line(report, args.evaluate)


def _check_dicom_outputs(study: DicomStudy, args: argparse.Namespace) -> None:
    """Refuses, before inference, a study whose DICOM outputs could not be written."""
    from model.io.dicom.outputs import dicom_output_problems

    problems = dicom_output_problems(study.reference, study.frames, preview=args.preview)
    if problems:
        raise CommandError(
            f"{'; '.join(problems)} for study {study.case.name}, so nothing was segmented. "
            "Correct the T1ce series' headers, or leave out --dicom-seg to get the NIfTI "
            "outputs only"
        )


def run(args: argparse.Namespace) -> int:
    from model.inference.pipeline import SegmentationOptions, load_predictor
    from model.inference.report import InferenceInfo
    from model.inference.tiling import TILINGS
    from model.net.checkpoint import describe_checkpoints

    out_dir = Path(args.out)
    jobs = _segment_inputs(args, out_dir)
    checkpoints = args.checkpoint or [default_checkpoint()]
    predictor, loaded = load_predictor(
        checkpoints,
        args.device,
        args.batch_size,
        TILINGS[args.tiling],
        tta=args.tta,
        precision=args.precision,
    )
    options = SegmentationOptions.for_postprocess(args.postprocess, args.probabilities, args.fusion)
    inference = InferenceInfo.describe(
        describe_checkpoints(loaded, metadata=False),
        tiling=args.tiling,
        tta=args.tta,
        device=str(predictor.device),
        precision=predictor.precision,
        batch_size=args.batch_size,
        postprocess=args.postprocess,
        fusion=args.fusion,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    for job in jobs:
        try:
            line = _segment_one(job, predictor, options, args, out_dir, inference)
        except Exception as exc:
            if len(jobs) == 1 or args.debug:
                raise
            failed.append(job.label)
            print(f"omnet segment: {job.label}: error: {one_line(exc)}", file=sys.stderr)
            continue
        print(line, flush=True)
    if failed:
        raise CommandError(f"{len(failed)} of {len(jobs)} cases failed: {', '.join(failed)}")
    return 0
