"""A real BraTS case through DICOM: written as a study, read back, segmentation as SEG."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from model.io.dicom.protocols import Acquisition
from model.io.dicom.seg import read_dicom_seg, write_dicom_seg
from model.io.dicom.study import read_dicom_study
from model.io.dicom.write_series import write_study
from model.io.nifti.files import find_label_file
from model.io.nifti.read import load_case, load_labels

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def brats_study(brats_case_dir, tmp_path_factory):
    """The case as DICOM: T1, T1ce and FLAIR axial, T2 a sagittal acquisition."""
    case = load_case(brats_case_dir)
    folder = tmp_path_factory.mktemp("brats") / case.name
    written = write_study(
        case.images, case.affine, folder, acquisitions={"t2": Acquisition("sagittal")}
    )
    return case, written, read_dicom_study(folder)


def test_brats_case_round_trips_through_dicom(brats_study):
    case, written, study = brats_study
    assert study.case.shape == case.shape == (240, 240, 155)
    assert np.allclose(study.case.affine, case.affine, atol=1e-6)
    assert np.array_equal(study.case.images, case.images)  # every modality, voxel for voxel
    assert study.resampled == ("t2",)  # sagittal slices, the same voxels in another order
    assert written["t2"].shape == (240, 155, 240)
    assert study.warnings == ()  # BraTS scans are skull-stripped
    t1ce = study.reference[0]
    assert [float(v) for v in t1ce.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in t1ce.PixelSpacing] == [1, 1]
    # LPS position of voxel (0, 0, 0): the NIfTI (RAS) origin with x and y negated.
    assert np.allclose(
        [float(v) for v in t1ce.ImagePositionPatient], case.affine[:3, 3] * [-1, -1, 1]
    )


def test_brats_reference_labels_as_dicom_seg(brats_study, brats_case_dir, tmp_path):
    case, _, study = brats_study
    labels = load_labels(find_label_file(brats_case_dir), like=case)
    path = write_dicom_seg(labels, study.reference, tmp_path / "seg.dcm")
    assert np.array_equal(read_dicom_seg(path, study.reference), labels)
    seg = pydicom.dcmread(path, stop_before_pixels=True)
    tumour_slices = int(np.count_nonzero(labels.any(axis=(0, 1))))
    assert len(seg.PerFrameFunctionalGroupsSequence) >= tumour_slices  # empty frames left out
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) not installed; the SEG read back correctly")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    assert not [line for line in run.stderr.splitlines() if line.startswith(("Error", "Warning"))]
