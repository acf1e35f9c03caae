"""Evaluation of label files against references: which files pair up, and their scores.

Matching rules (``omnet evaluate`` documents them to users):

* A folder's label files are the NIfTI files directly inside it. When some are named
  ``<case>_seg`` (or ``<case>-seg``), only those count; otherwise every ``<case>.nii``
  (``.nii.gz``, ``.nii.bz2``) does, except ``<case>_probabilities`` files.
* A reference folder may also hold BraTS case folders, ``<case>/`` with its label map.
* A prediction and a reference match when their case names are equal (exact,
  case-sensitive); cases found on one side only are reported, the others evaluated.
* A prediction file against a BraTS case folder uses that folder's label map.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from model.evaluation.metrics import RegionMetrics, evaluate_case
from model.io.nifti.files import find_label_file, nifti_stem, strip_label_suffix
from model.io.nifti.read import load_labels
from model.io.volumes import AFFINE_ATOL
from model.labels import ENHANCING

PROBABILITIES_SUFFIX = "_probabilities"


class MatchError(ValueError):
    """Prediction and reference paths cannot be paired (message says why and what to do)."""


def label_files_in(folder: Path) -> dict[str, Path]:
    """Label files directly inside ``folder`` by case name (rules in the module docstring).

    Raises:
        MatchError: two files claim the same case.
    """
    stems = {
        p: stem
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and (stem := nifti_stem(p)) is not None
    }
    seg = [p for p, stem in stems.items() if strip_label_suffix(stem) != stem]
    chosen = seg or [p for p, s in stems.items() if not s.endswith(PROBABILITIES_SUFFIX)]
    files: dict[str, Path] = {}
    for path in chosen:
        name = strip_label_suffix(stems[path])
        if name in files:
            raise MatchError(
                f"folder {folder} has two label files for case {name}: "
                f"{files[name].name} and {path.name}; keep one"
            )
        files[name] = path
    return files


def reference_files_in(folder: Path) -> dict[str, Path]:
    """Flat reference files and BraTS case folders' label maps, by case name."""
    files = label_files_in(folder)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = find_label_file(sub)
        if label is None:
            continue
        if sub.name in files:
            raise MatchError(
                f"folder {folder} has two references for case {sub.name}: "
                f"{files[sub.name].name} and {label}; keep one"
            )
        files[sub.name] = label
    return files


def _single_pair(pred: Path, ref: Path) -> dict[str, tuple[Path, Path]]:
    if ref.is_dir():
        label = find_label_file(ref)
        if label is None:
            raise MatchError(
                f"reference folder {ref} has no label map <case>_seg.nii.gz; give the "
                "reference label file, or two folders"
            )
        ref = label
    name = strip_label_suffix(nifti_stem(pred) or pred.name)
    return {name: (pred, ref)}


def _unmatched(names: list[str], message: str) -> str:
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    return f"{message} {len(names)} case(s): {shown}"


def match_label_files(pred: Path, ref: Path) -> tuple[dict[str, tuple[Path, Path]], list[str]]:
    """Pairs predictions with references by case name.

    Returns:
        ``{case: (prediction file, reference file)}`` and one message per side for the
        cases found on that side only.

    Raises:
        MatchError: a path is missing, or a folder and a file are mixed the wrong way.
    """
    for path, what in ((pred, "prediction"), (ref, "reference")):
        if not path.exists():
            raise MatchError(f"{what} {path} does not exist")
    if pred.is_file():
        return _single_pair(pred, ref), []
    if ref.is_file():
        raise MatchError(
            f"prediction {pred} is a folder but reference {ref} is a file; give two files "
            "or two folders"
        )
    preds = label_files_in(pred)
    if not preds:
        raise MatchError(f"prediction folder {pred} holds no NIfTI label files")
    refs = reference_files_in(ref)
    errors = [
        _unmatched(names, message)
        for names, message in (
            (sorted(set(preds) - set(refs)), f"no reference in {ref} for"),
            (sorted(set(refs) - set(preds)), f"no prediction in {pred} for"),
        )
        if names
    ]
    pairs = {name: (preds[name], refs[name]) for name in sorted(set(preds) & set(refs))}
    return pairs, errors


def evaluate_label_files(pred: Path, ref: Path) -> dict[str, RegionMetrics]:
    """Scores one prediction file against one reference file on the reference's grid
    (spacing from the reference's header).

    Raises:
        InputError: a file cannot be read as a label map.
        MatchError: the two files are not on the same voxel grid.
    """
    ref_labels = load_labels(ref)
    pred_labels = load_labels(pred)
    if pred_labels.shape != ref_labels.shape:
        raise MatchError(
            f"prediction {pred} has shape {pred_labels.shape} but reference {ref} has "
            f"{ref_labels.shape}; both must be on the same voxel grid"
        )
    # Headers only (nibabel reads voxel data lazily); load_labels checked both are NIfTI.
    ref_img = cast(nib.Nifti1Image, nib.load(ref))
    pred_img = cast(nib.Nifti1Image, nib.load(pred))
    diff = float(np.max(np.abs(pred_img.affine - ref_img.affine)))
    if diff > AFFINE_ATOL:
        raise MatchError(
            f"prediction {pred} and reference {ref} have different affines (largest "
            f"difference {diff:.4g} mm); they are not on the same grid"
        )
    zooms = ref_img.header.get_zooms()
    spacing = (float(zooms[0]), float(zooms[1]), float(zooms[2]))
    return evaluate_case(pred_labels, ref_labels, spacing, ENHANCING, ENHANCING)
