"""Time the DICOM steps of a job beside its inference, on a real case.

    python bench/dicom_pipeline.py [CASE] [--checkpoint CKPT] [--tiling wide]
        [--dicomweb URL] [--threads 2] [--repeats 1] [--json]

Writes the BraTS case CASE (default: the first under ``$OMNET_DATA_DIR/brats2018``) as a
DICOM study (:func:`model.io.dicom.write_series.write_study`: T1, T1ce and FLAIR axial on the
case's grid, T2 on sagittal slices of 1 x 1 x 2 mm, so that it must be resampled; not
timed), then times what a DICOM job adds to its inference, each step on its own:

* ``check``: the header checks of a submission (:func:`model.io.dicom.study.check_dicom_study`);
* ``convert``: decoding the four series onto the T1ce grid, resampling included
  (:func:`model.io.dicom.study.read_dicom_study`), and ``resample`` alone (the T2 onto
  the T1ce grid, :func:`model.io.resample.resample_to_grid`);
* ``inference``: :func:`model.inference.case.process_case` with the checkpoint (default: the
  bundled model), the default post-processing and the tiling given;
* ``seg`` and ``preview``: writing the DICOM SEG and the Secondary Capture;
* with a DICOMweb server (``--dicomweb``, default ``http://127.0.0.1:8042/dicom-web``
  when it answers): ``stow`` (storing the SEG and preview, STOW-RS), ``retrieve``
  (WADO-RS of the study's four series, what a job by ``study_uid`` does first) and
  ``store_study`` (storing the source study there; what the PACS did before, shown
  for scale).

Each figure is the median over ``--repeats`` (seconds), with its ratio to the inference
of the same run; the machine is shared, so only the ratios carry over.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def default_case() -> Path:
    from model.training.data import DATA_ENV, resolve_data_dir

    root = resolve_data_dir(os.environ.get(DATA_ENV)) / "brats2018"
    return sorted(p for p in root.iterdir() if p.is_dir())[0]


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _answers(url: str) -> bool:
    import requests

    try:
        return requests.get(f"{url}/studies", params={"limit": 1}, timeout=3).status_code == 200
    except requests.RequestException:
        return False


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from model.inference.case import CaseOutputs, process_case
    from model.inference.pipeline import SegmentationOptions, load_predictor
    from model.inference.tiling import TILINGS
    from model.io.dicom.outputs import write_preview_dicom
    from model.io.dicom.protocols import Acquisition, StudyInfo
    from model.io.dicom.seg import write_dicom_seg
    from model.io.dicom.study import GRID_MODALITY, check_dicom_study, read_dicom_study
    from model.io.dicom.write_series import write_study
    from model.io.nifti.read import load_case, load_labels
    from model.io.resample import resample_to_grid
    from model.io.volumes import MODALITIES
    from model.weights import BUNDLED_PATH

    torch.set_num_threads(args.threads)
    case = load_case(args.case)
    work = Path(tempfile.mkdtemp(prefix="omnet-dicom-bench-"))
    info = StudyInfo()
    written = write_study(
        case.images,
        case.affine,
        work / "study",
        study=info,
        acquisitions={"t2": Acquisition("sagittal", spacing=(1.0, 1.0, 2.0))},
    )
    times: dict[str, float] = {}
    times["check"], _ = _timed(lambda: check_dicom_study(work / "study"), args.repeats)
    times["convert"], study = _timed(lambda: read_dicom_study(work / "study"), args.repeats)
    t2, grid = written["t2"], written[GRID_MODALITY]
    t2_volume = np.zeros(t2.shape, dtype=np.float32)  # values do not change the time
    times["resample"], _ = _timed(
        lambda: resample_to_grid(t2_volume, t2.affine, grid.shape, grid.affine, order=1),
        args.repeats,
    )

    predictor, _ = load_predictor(
        [args.checkpoint or str(BUNDLED_PATH)], "cpu", 16, TILINGS[args.tiling]
    )
    options = SegmentationOptions.for_postprocess("components")
    outputs = CaseOutputs(work / "seg.nii.gz")
    times["inference"], report = _timed(
        lambda: process_case(study.case, predictor, outputs, options), args.repeats
    )
    labels = load_labels(report.outputs["segmentation"], like=study.case)
    times["seg"], _ = _timed(
        lambda: write_dicom_seg(labels, study.reference, work / "seg.dcm"), args.repeats
    )
    flair = study.case.images[MODALITIES.index("flair")]
    times["preview"], _ = _timed(
        lambda: write_preview_dicom(
            flair, labels, study.case.affine, study.reference[0], work / "preview.dcm"
        ),
        args.repeats,
    )
    server = args.dicomweb
    if server and _answers(server):
        _dicomweb_times(server, work, info.study_instance_uid, written, times, args.repeats)
    else:
        server = None
    inference = times["inference"]
    return {
        "case": case.name,
        "shape": list(case.shape),
        "tiling": args.tiling,
        "threads": args.threads,
        "dicomweb": server,
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "fraction_of_inference": {
            k: round(v / inference, 4) for k, v in times.items() if k != "inference"
        },
    }


def _dicomweb_times(
    url: str,
    work: Path,
    study_uid: str,
    written: dict[str, Any],
    times: dict[str, float],
    repeats: int,
) -> None:
    from service.config import parse_endpoint
    from service.dicomweb import retrieve_study, store_files

    endpoint = parse_endpoint("bench", url)
    source_files = [f for s in written.values() for f in s.files]
    times["store_study"], _ = _timed(lambda: store_files(endpoint, source_files, 300), 1)
    times["stow"], _ = _timed(
        lambda: store_files(endpoint, [work / "seg.dcm", work / "preview.dcm"], 300), repeats
    )
    uids = [s.series_instance_uid for s in written.values()]
    counter = iter(range(1000))

    def retrieve() -> int:
        return retrieve_study(
            endpoint,
            study_uid,
            work / f"retrieved{next(counter)}",
            series_uids=uids,
            max_bytes=8 << 30,
            timeout_s=300,
        )

    times["retrieve"], _ = _timed(retrieve, repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("case", nargs="?", type=Path, default=None)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--tiling", default="wide", choices=("wide", "paper"))
    parser.add_argument("--dicomweb", default="http://127.0.0.1:8042/dicom-web")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.case = args.case or default_case()
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['case']} {tuple(result['shape'])}, tiling {result['tiling']}, "
        f"{result['threads']} threads, DICOMweb: {result['dicomweb'] or 'none'}"
    )
    print(f"{'step':<12} {'seconds':>8} {'x inference':>12}")
    for step, seconds in result["seconds"].items():
        ratio = result["fraction_of_inference"].get(step)
        print(f"{step:<12} {seconds:>8.2f} {'' if ratio is None else f'{ratio:>12.3f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
