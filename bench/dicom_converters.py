"""DICOM series -> volume converters compared for correctness and speed.

    python bench/dicom_converters.py [CASE] [--repeats 3] [--json]

Writes the BraTS case CASE (default: the first under ``$OMNET_DATA_DIR/brats2018``) as a
DICOM study with :func:`model.io.dicom.write_series.write_study` - T1, T1ce and FLAIR axial on
the case's grid, T2 as a sagittal acquisition (the same voxels, another slice order),
and a FLAIR resampled onto coronal slices tilted by 12 degrees (float values, stored
with RescaleSlope / RescaleIntercept) - and converts each series back to a volume with:

* ``simpleitk``: ``SimpleITK.ImageSeriesReader`` on the file list, sorted along the
  slice normal (what :mod:`model.io.dicom.study` does; sorting needs the headers, which
  the reader has read already to group and check the series, so it is not timed);
* ``dcm2niix``: the ``dcm2niix`` program (Debian package ``dcm2niix``) on the series
  folder, uncompressed NIfTI read back with nibabel;
* ``dicom2nifti``: ``dicom2nifti.dicom_series_to_nifti`` (``pip install dicom2nifti``);
* ``pydicom``: reading every file with pydicom and stacking ``pixel_array``
  (a baseline: no converter).

For each: seconds per series (median over ``--repeats``), and correctness: the volume
is put back on the grid it was written on (exactly: the grids share voxel centres) and
compared voxel for voxel with what was written (the resampled FLAIR within its storage
step, RescaleSlope / 2); the geometry error is
reported too (as the largest distance, in voxels, of the voxel mapping from an exact
signed permutation with integer offsets: 0 when the geometry is right, whatever voxel
order the converter chose). A converter that is not installed is reported as such.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

Converter = Callable[[list[Path], Path], tuple[np.ndarray, np.ndarray]]


def default_case() -> Path:
    import os

    from model.training.data import DATA_ENV, resolve_data_dir

    root = resolve_data_dir(os.environ.get(DATA_ENV)) / "brats2018"
    return sorted(p for p in root.iterdir() if p.is_dir())[0]


def _sorted_files(files: list[Path]) -> list[Path]:
    import pydicom

    def key(path: Path) -> float:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        return float(np.asarray(ds.ImagePositionPatient, dtype=float) @ np.cross(iop[:3], iop[3:]))

    return sorted(files, key=key)


def with_simpleitk(files: list[Path], work: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk  # noqa: N813 (the library's own abbreviation)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in _sorted_files(files)])
    image = reader.Execute()
    volume = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return volume, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def with_dcm2niix(files: list[Path], work: Path) -> tuple[np.ndarray, np.ndarray]:
    out = work / "dcm2niix"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    subprocess.run(
        ["dcm2niix", "-z", "n", "-b", "n", "-f", "vol", "-o", str(out), str(files[0].parent)],
        check=True,
        capture_output=True,
    )
    (nii,) = out.glob("*.nii")
    img = nib.load(nii)
    return np.asarray(img.dataobj), img.affine


def with_dicom2nifti(files: list[Path], work: Path) -> tuple[np.ndarray, np.ndarray]:
    import dicom2nifti

    out = work / "dicom2nifti.nii"
    result = dicom2nifti.dicom_series_to_nifti(str(files[0].parent), str(out), reorient_nifti=False)
    img = result["NII"]
    return np.asarray(img.dataobj), img.affine


def with_pydicom(files: list[Path], work: Path) -> tuple[np.ndarray, np.ndarray]:
    import pydicom

    from model.io.dicom.protocols import RAS_TO_LPS

    datasets = [pydicom.dcmread(f) for f in _sorted_files(files)]
    volume = np.stack(
        [
            ds.pixel_array.T * float(ds.get("RescaleSlope", 1))
            + float(ds.get("RescaleIntercept", 0))
            for ds in datasets
        ],
        axis=-1,
    )
    first = datasets[0]
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    rows, cols = (float(x) for x in first.PixelSpacing)
    p0 = np.asarray(first.ImagePositionPatient, dtype=float)
    p1 = np.asarray(datasets[1].ImagePositionPatient, dtype=float)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = iop[:3] * cols, iop[3:] * rows, p1 - p0, p0
    return volume, RAS_TO_LPS @ lps


CONVERTERS: dict[str, Converter] = {
    "simpleitk": with_simpleitk,
    "dcm2niix": with_dcm2niix,
    "dicom2nifti": with_dicom2nifti,
    "pydicom": with_pydicom,
}


def _available(name: str) -> str | None:
    """None when the converter can run, else why not."""
    import importlib.util

    if name == "dcm2niix":
        return None if shutil.which("dcm2niix") else "dcm2niix not on PATH"
    module = {"simpleitk": "SimpleITK", "dicom2nifti": "dicom2nifti", "pydicom": "pydicom"}[name]
    return None if importlib.util.find_spec(module) else f"{module} not installed"


def main(argv: list[str] | None = None) -> int:
    from model.io.dicom.protocols import Acquisition
    from model.io.dicom.write_series import write_study
    from model.io.nifti.read import load_case
    from model.io.resample import resample_to_grid, voxel_mapping
    from model.io.volumes import MODALITIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", nargs="?", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    case = load_case(args.case or default_case())
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        series = write_study(
            case.images, case.affine, work / "study", acquisitions={"t2": Acquisition("sagittal")}
        )
        oblique = write_study(
            case.images,
            case.affine,
            work / "oblique",
            acquisitions={"flair": Acquisition("coronal", angle_deg=12.0)},
        )
        series = {**series, "flair_oblique": oblique["flair"]}
        for name, convert in CONVERTERS.items():
            missing = _available(name)
            if missing:
                results[name] = {"skipped": missing}
                continue
            seconds, worst, affine_error = [], 0.0, 0.0
            for modality, written in series.items():
                times = []
                files = _sorted_files(list(written.files))  # the reader has the headers
                for _ in range(args.repeats):
                    tick = time.perf_counter()
                    volume, affine = convert(files, work)
                    times.append(time.perf_counter() - tick)
                seconds.append(statistics.median(times))
                volume = np.squeeze(np.asarray(volume, dtype=np.float32))
                # Written voxel -> converter voxel: a signed permutation with integer
                # offsets when the grid is right; its distance from one, in voxels.
                mapping = voxel_mapping(affine, written.affine)
                affine_error = max(affine_error, float(np.abs(mapping - np.round(mapping)).max()))
                back = resample_to_grid(volume, affine, written.shape, written.affine, order=0)
                original = case.images[MODALITIES.index(modality.split("_")[0])]
                expected = resample_to_grid(original, case.affine, written.shape, written.affine)
                worst = max(worst, float(np.abs(back - expected).max()))
            results[name] = {
                "seconds_per_series": [round(s, 3) for s in seconds],
                "mean_seconds": round(statistics.mean(seconds), 3),
                "max_abs_voxel_error": worst,
                "max_grid_error_voxels": affine_error,
            }
    if args.json:
        print(json.dumps({"case": case.name, "results": results}, indent=2))
        return 0
    print(
        f"{case.name}: {case.shape}, series T1/T1ce/FLAIR axial, T2 sagittal, FLAIR coronal "
        "tilted 12 degrees (resampled, rescaled)"
    )
    for name, r in results.items():
        if "skipped" in r:
            print(f"  {name:12s} skipped: {r['skipped']}")
            continue
        print(
            f"  {name:12s} {r['mean_seconds']:.3f} s/series {r['seconds_per_series']}  "
            f"max voxel error {r['max_abs_voxel_error']:g}  "
            f"grid error {r['max_grid_error_voxels']:.2g} voxels"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
