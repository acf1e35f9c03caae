"""model/io/dicom/write_series.py: MR series written from a volume and an affine."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from model.io.dicom.protocols import PROTOCOLS, Acquisition, StudyInfo, acquisition_grid
from model.io.dicom.write_series import write_mr_series, write_study
from model.io.phantom import make_phantom
from model.io.resample import resample_to_grid


def _read(files):
    return [pydicom.dcmread(f) for f in files]


def test_hand_worked_geometry(tmp_path):
    vol = np.arange(24, dtype=np.int16).reshape(4, 3, 2)  # (X, Y, Z)
    affine = np.array(
        [[-2.0, 0, 0, 10], [0, -1.5, 0, 20], [0, 0, 3, -30], [0, 0, 0, 1]]
    )  # RAS: x to the left, y to posterior, slices 3 mm apart upwards
    written = write_mr_series(vol, affine, tmp_path, "t1", study=StudyInfo())
    slices = _read(written.files)
    assert len(slices) == 2
    for k, ds in enumerate(slices):
        # LPS: the first axis runs to the left (+x), the second to posterior (+y).
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.ImagePositionPatient] == [-10, -20, -30 + 3 * k]
        assert [float(v) for v in ds.PixelSpacing] == [1.5, 2.0]  # [rows, columns]
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 3.0
        assert (ds.Rows, ds.Columns) == (3, 4)
        assert ds.InstanceNumber == k + 1
        assert np.array_equal(ds.pixel_array, vol[:, :, k].T)
        assert ds.PixelRepresentation == 0 and "RescaleSlope" not in ds
    assert written.shape == (4, 3, 2)
    assert np.array_equal(written.affine, affine)


def test_study_shares_uids_and_names_each_modality(tmp_path):
    images, _, affine = make_phantom((24, 20, 16), seed=0)
    study = StudyInfo(patient_id="P-1")
    written = write_study(images, affine, tmp_path, study=study)
    firsts = {m: pydicom.dcmread(w.files[0]) for m, w in written.items()}
    assert {ds.StudyInstanceUID for ds in firsts.values()} == {study.study_instance_uid}
    assert {ds.FrameOfReferenceUID for ds in firsts.values()} == {study.frame_of_reference_uid}
    assert {ds.PatientID for ds in firsts.values()} == {"P-1"}
    assert len({ds.SeriesInstanceUID for ds in firsts.values()}) == 4
    descriptions = {m: ds.SeriesDescription for m, ds in firsts.items()}
    assert descriptions == {"t1": "T1", "t1ce": "T1 post contrast", "t2": "T2", "flair": "FLAIR"}
    for modality, ds in firsts.items():
        assert ds.Modality == "MR"
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage
        assert float(ds.RepetitionTime) == PROTOCOLS[modality].repetition_time
        assert ("ContrastBolusAgent" in ds) == (modality == "t1ce")
        assert ds.ProtocolName.endswith("_tra")
    assert float(firsts["flair"].InversionTime) == 2500.0
    # Every slice of a series is in its own folder, numbered.
    assert all(len(w.files) == 16 for w in written.values())


def test_sagittal_acquisition_permutes_the_voxels_exactly(tmp_path):
    images, _, affine = make_phantom((24, 20, 16), seed=1)
    written = write_mr_series(
        images[2], affine, tmp_path, "t2", study=StudyInfo(), acquisition=Acquisition("sagittal")
    )
    slices = _read(written.files)
    assert [float(v) for v in slices[0].ImageOrientationPatient] == [0, 1, 0, 0, 0, -1]
    assert written.shape == (20, 16, 24)  # columns along y, rows along z, slices along x
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
    # The normal is (0,1,0) x (0,0,-1) = (-1, 0, 0) in LPS: slices step to the right.
    assert np.allclose(np.diff(positions, axis=0), [-1.0, 0.0, 0.0])
    assert slices[0].ProtocolName.endswith("_sag")
    volume = np.stack([ds.pixel_array.T for ds in slices], axis=-1).astype(np.float32)
    back = resample_to_grid(volume, written.affine, images.shape[1:], affine)
    assert np.array_equal(back, images[2])


def test_tilted_coronal_acquisition(tmp_path):
    images, _, affine = make_phantom((24, 20, 16), seed=2)
    written = write_mr_series(
        images[3],
        affine,
        tmp_path,
        "flair",
        study=StudyInfo(),
        acquisition=Acquisition("coronal", spacing=(1.0, 1.0, 2.0), angle_deg=15.0),
    )
    ds = pydicom.dcmread(written.files[0])
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    angle = np.radians(15.0)
    assert np.allclose(iop, [1, 0, 0, 0, np.sin(angle), -np.cos(angle)], atol=1e-9)
    assert float(ds.SliceThickness) == 2.0
    assert "RescaleSlope" in ds  # interpolated values are not integers
    assert ds.ProtocolName.endswith("_cor")


def test_acquisition_grid_covers_the_volume():
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    shape, grid = acquisition_grid((10, 12, 8), affine, "coronal")
    assert shape == (10, 8, 12)
    corners = grid @ np.array([[0, 0, 0, 1], [9, 7, 11, 1]]).T
    assert sorted(corners[0]) == [0.0, 9.0] and sorted(corners[2]) == [0.0, 7.0]
    with pytest.raises(ValueError, match="plane"):
        acquisition_grid((10, 12, 8), affine, "oblique")


def test_values_are_stored_exactly_or_rescaled(tmp_path):
    signed = np.array([[[-5, 7]]], dtype=np.float32).reshape(1, 1, 2)
    ds = pydicom.dcmread(
        write_mr_series(signed, np.eye(4), tmp_path / "a", "t1", study=StudyInfo()).files[0]
    )
    assert ds.PixelRepresentation == 1 and ds.pixel_array[0, 0] == -5
    real = np.array([0.25, 1000.5], dtype=np.float32).reshape(1, 1, 2)
    files = write_mr_series(real, np.eye(4), tmp_path / "b", "t1", study=StudyInfo()).files
    values = [
        float(d.pixel_array[0, 0]) * float(d.RescaleSlope) + float(d.RescaleIntercept)
        for d in _read(files)
    ]
    assert np.allclose(values, [0.25, 1000.5], atol=1000.25 / 65535)
    with pytest.raises(ValueError, match="NaN"):
        write_mr_series(
            np.full((1, 1, 2), np.nan), np.eye(4), tmp_path / "c", "t1", study=StudyInfo()
        )


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="modality"):
        write_mr_series(np.zeros((2, 2, 2)), np.eye(4), tmp_path, "dwi", study=StudyInfo())
    with pytest.raises(ValueError, match="3D"):
        write_mr_series(np.zeros((2, 2)), np.eye(4), tmp_path, "t1", study=StudyInfo())
    with pytest.raises(ValueError, match="acquisitions"):
        write_study(np.ones((4, 2, 2, 2)), np.eye(4), tmp_path, acquisitions={"dwi": Acquisition()})


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) not installed"
)
def test_written_images_pass_dciodvfy(tmp_path):
    images, _, affine = make_phantom((20, 20, 16), seed=0)
    written = write_study(images, affine, tmp_path, acquisitions={"t2": Acquisition("sagittal")})
    for series in written.values():
        result = subprocess.run(["dciodvfy", str(series.files[0])], capture_output=True, text=True)
        messages = [
            line for line in result.stderr.splitlines() if line.startswith(("Error", "Warning"))
        ]
        assert not messages, messages
