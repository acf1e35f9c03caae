"""model/io/dicom/study.py: DICOM studies read as cases, and what is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from model.io.dicom.classify import classify_series
from model.io.dicom.protocols import Acquisition, StudyInfo
from model.io.dicom.scan import scan_study
from model.io.dicom.study import read_dicom_study, skull_stripping_warning
from model.io.dicom.write_series import write_mr_series, write_study
from model.io.phantom import make_phantom
from model.io.volumes import ERROR_CODES, MODALITIES, InputError

SHAPE = (32, 28, 18)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(SHAPE, seed=3)


@pytest.fixture(scope="module")
def axial_study(tmp_path_factory, phantom):
    """A phantom study, every series on the phantom's grid; copied before changes."""
    images, _, affine = phantom
    folder = tmp_path_factory.mktemp("axial") / "study1"
    written = write_study(images, affine, folder, study=StudyInfo(patient_id="P1"))
    return folder, written


@pytest.fixture
def study(tmp_path, axial_study):
    """A fresh copy of the axial study, free to change."""
    folder, written = axial_study
    copy = tmp_path / "study1"
    shutil.copytree(folder, copy)
    files = {m: [copy / f.relative_to(folder) for f in w.files] for m, w in written.items()}
    uids = {m: w.series_instance_uid for m, w in written.items()}
    return copy, files, uids


def _edit(files, change) -> None:
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        change(ds, k)
        ds.save_as(path)


def _code(path, **kwargs) -> InputError:
    with pytest.raises(InputError) as exc:
        read_dicom_study(path, **kwargs)
    assert exc.value.code in ERROR_CODES
    return exc.value


# --------------------------------------------------------------------------- round trips


def test_axial_study_reads_back_exactly(axial_study, phantom):
    images, _, affine = phantom
    folder, written = axial_study
    result = read_dicom_study(folder)
    case = result.case
    assert case.name == "study1"
    assert case.images.dtype == np.float32 and case.images.shape == (4, *SHAPE)
    assert np.array_equal(case.images, images)
    assert np.allclose(case.affine, affine, atol=1e-6)
    assert case.spacing == (1.0, 1.0, 1.0)
    assert np.allclose(case.header.get_best_affine(), affine, atol=1e-5)
    assert {m: s.uid for m, s in result.series.items()} == {
        m: w.series_instance_uid for m, w in written.items()
    }
    assert result.resampled == () and result.warnings == () and result.others == ()
    # The reference is the T1ce in slice order: instance k is the case's slice z = k.
    assert [ds.SOPInstanceUID for ds in result.reference] == [
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in written["t1ce"].files
    ]


def test_zip_and_flat_folder_read_the_same(tmp_path, axial_study, phantom):
    images = phantom[0]
    folder, written = axial_study
    archive = Path(shutil.make_archive(str(tmp_path / "zipped"), "zip", folder))
    from_zip = read_dicom_study(archive)
    assert from_zip.case.name == "zipped"
    assert np.array_equal(from_zip.case.images, images)
    flat = tmp_path / "flat"
    flat.mkdir()
    rng = np.random.default_rng(0)
    for series in written.values():
        for f in series.files:  # one folder, names that say nothing
            shutil.copy(f, flat / f"{rng.integers(1 << 40):x}")
    (flat / "notes.txt").write_text("not DICOM")
    assert np.array_equal(read_dicom_study(flat, name="x").case.images, images)


def test_sagittal_and_coronal_series_are_put_on_the_t1ce_grid(tmp_path, phantom):
    images, _, affine = phantom
    acquisitions = {"t2": Acquisition("sagittal"), "flair": Acquisition("coronal")}
    write_study(images, affine, tmp_path / "s", acquisitions=acquisitions)
    result = read_dicom_study(tmp_path / "s")
    assert set(result.resampled) == {"t2", "flair"}
    assert np.array_equal(result.case.images, images)  # same voxel centres: copied exactly


def test_non_axial_t1ce_defines_the_grid(tmp_path, phantom):
    images, _, affine = phantom
    written = write_study(
        images, affine, tmp_path / "s", acquisitions={"t1ce": Acquisition("sagittal")}
    )
    result = read_dicom_study(tmp_path / "s")
    assert result.case.shape == written["t1ce"].shape
    assert np.allclose(result.case.affine, written["t1ce"].affine, atol=1e-6)
    assert set(result.resampled) == {"t1", "t2", "flair"}
    # Back on the phantom's grid, every modality is the original.
    from model.io.resample import resample_to_grid

    for c in range(4):
        back = resample_to_grid(result.case.images[c], result.case.affine, SHAPE, affine)
        assert np.array_equal(back, images[c])


def test_tilted_series_resampled_within_interpolation_tolerance(tmp_path):
    # Intensities linear in world coordinates: trilinear interpolation reproduces them
    # exactly, so any error is geometry (or 16-bit storage, slope / 2).
    shape = (30, 26, 20)
    affine = np.diag([1.0, 1.2, 1.5, 1.0])
    affine[:3, 3] = (-15, -14, -10)
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape(3, *shape)
    ramp = (500 + 3 * world[0] - 2 * world[1] + 5 * world[2]).astype(np.float32)
    images = np.stack([ramp + 100 * c for c in range(4)])
    acquisitions = {
        "flair": Acquisition("coronal", spacing=(0.9, 1.1, 2.0), angle_deg=17.0),
        "t2": Acquisition("axial", angle_deg=-9.0),
    }
    write_study(images, affine, tmp_path / "s", acquisitions=acquisitions)
    result = read_dicom_study(tmp_path / "s")
    assert set(result.resampled) == {"t2", "flair"}
    inner = (slice(3, -3), slice(3, -3), slice(3, -3))  # away from the tilted edges
    for c in range(4):
        error = np.abs(result.case.images[c][inner] - images[c][inner])
        assert error.max() < 0.05, (MODALITIES[c], error.max())


@pytest.mark.skipif(
    shutil.which("dcmcjpls") is None, reason="dcmcjpls (Debian dcmtk) not installed"
)
def test_compressed_series_decode_to_the_same_volume(study, phantom):
    import subprocess

    folder, files, _ = study
    for path in files["t1ce"]:  # JPEG-LS lossless, as some PACS send it
        subprocess.run(["dcmcjpls", str(path), str(path)], check=True, capture_output=True)
    assert pydicom.dcmread(files["t1ce"][0]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    assert np.array_equal(read_dicom_study(folder).case.images, phantom[0])


# --------------------------------------------------------------------------- mapping


def _series(description="", protocol="", **attributes) -> Dataset:
    ds = Dataset()
    ds.SeriesDescription = description
    ds.ProtocolName = protocol
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(
    ("description", "protocol", "attributes", "expected"),
    [
        ("T1", "", {}, "t1"),
        ("T1 post contrast", "", {}, "t1ce"),
        ("AX T1 +C", "", {}, "t1ce"),
        ("t1_mprage_sag_p2_iso", "", {"ContrastBolusAgent": "Gadovist"}, "t1ce"),
        ("T1 MPRAGE pre", "", {"ContrastBolusAgent": "Gadovist"}, "t1"),
        ("", "t1_se_tra_post_gd", {}, "t1ce"),
        ("T1W_SE", "", {}, "t1"),
        ("T1CE", "", {}, "t1ce"),
        ("Ax T2 FLAIR", "", {}, "flair"),
        ("", "t2_tirm_tra_dark-fluid", {}, "flair"),
        ("t2_tse_tra", "", {}, "t2"),
        ("T2 post", "", {"ContrastBolusAgent": "Gd"}, "t2"),
        ("T2*", "", {}, None),
        ("SWI", "", {}, None),
        ("DWI b1000", "", {}, None),
        # No telling text: the sequence attributes decide.
        (
            "Series 5",
            "",
            {
                "ScanningSequence": ["SE", "IR"],
                "RepetitionTime": 9000,
                "EchoTime": 81,
                "InversionTime": 2500,
            },
            "flair",
        ),
        ("Series 6", "", {"ScanningSequence": "SE", "RepetitionTime": 5000, "EchoTime": 100}, "t2"),
        ("Series 7", "", {"ScanningSequence": "SE", "RepetitionTime": 500, "EchoTime": 10}, "t1"),
        (
            "Series 8",
            "",
            {
                "ScanningSequence": "SE",
                "RepetitionTime": 500,
                "EchoTime": 10,
                "ContrastBolusAgent": "Gd",
            },
            "t1ce",
        ),
        (
            "T1 FLAIR",
            "",
            {
                "ScanningSequence": ["SE", "IR"],
                "RepetitionTime": 2000,
                "EchoTime": 12,
                "InversionTime": 800,
            },
            "t1",
        ),
        ("Series 9", "", {"RepetitionTime": 30, "EchoTime": 45}, None),
    ],
)
def test_series_are_classified(description, protocol, attributes, expected):
    assert classify_series(_series(description, protocol, **attributes)) == expected


def test_rules_are_configurable():
    from model.io.dicom.classify import SeriesRule

    rules = (SeriesRule("flair", r"\bdf\b"),)
    assert classify_series(_series("ax df"), rules) == "flair"
    assert classify_series(_series("FLAIR"), rules, use_sequence=False) is None


def _duplicate(files, folder: Path, number: int, **changes) -> str:
    """Copies a series under a new SeriesInstanceUID; returns the UID."""
    uid = generate_uid()
    folder.mkdir()
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesNumber = number
        for key, value in changes.items():
            setattr(ds, key, value)
        ds.save_as(folder / f"{k}.dcm")
    return uid


def test_ambiguous_series_name_the_candidates_and_an_override_resolves(study):
    folder, files, uids = study
    extra = _duplicate(files["t1ce"], folder / "extra", 12, SeriesDescription="T1 gad 3D")
    error = _code(folder)
    assert error.code == "ambiguous_series"
    assert uids["t1ce"] in str(error) and extra in str(error) and "T1 gad 3D" in str(error)
    chosen = read_dicom_study(folder, overrides={"t1ce": extra})
    assert chosen.series["t1ce"].uid == extra
    assert [s.uid for s in chosen.others] == [uids["t1ce"]]
    assert read_dicom_study(folder, overrides={"t1ce": "12"}).series["t1ce"].uid == extra


def test_original_images_win_over_derived_reformats(study):
    folder, files, uids = study
    _duplicate(
        files["t1"],
        folder / "mpr",
        30,
        SeriesDescription="T1 MPR",
        ImageType=["DERIVED", "SECONDARY", "MPR"],
    )
    assert read_dicom_study(folder).series["t1"].uid == uids["t1"]


def test_missing_modality_lists_the_series_found(study):
    folder, files, _ = study
    shutil.rmtree(files["t2"][0].parent)
    error = _code(folder)
    assert error.code == "missing_modality"
    message = str(error)
    assert (
        "t2" in message
        and "'FLAIR'" in message
        and "-> flair" in message
        and "t2=<SeriesInstanceUID>" in message
    )


def test_localizers_are_skipped_but_refused_when_named(study):
    folder, files, _ = study
    loc = _duplicate(
        files["t1"][:3],
        folder / "loc",
        1,
        SeriesDescription="localizer T1",
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
    )
    result = read_dicom_study(folder)
    assert [s.uid for s in result.others] == [loc]
    assert _code(folder, overrides={"t1": loc}).code == "derived_series"


@pytest.mark.parametrize(
    ("overrides", "code"),
    [({"t1": "1.2.3.4"}, "unknown_series"), ({"dwi": "1.2.3"}, "unknown_modality")],
)
def test_bad_overrides(study, overrides, code):
    assert _code(study[0], overrides=overrides).code == code


def test_one_series_for_two_modalities_is_refused(study):
    folder, _, uids = study
    error = _code(folder, overrides={"t1": uids["t2"], "t2": uids["t2"]})
    assert error.code == "ambiguous_series"


# --------------------------------------------------------------------------- refusals


def test_mixed_orientation(study):
    folder, files, _ = study
    _edit(
        files["t2"][:1], lambda ds, k: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1])
    )
    error = _code(folder)
    assert error.code == "mixed_orientation" and "t2" in str(error)


def test_missing_slice_is_uneven_spacing(study):
    folder, files, _ = study
    files["flair"][7].unlink()
    assert _code(folder).code == "uneven_spacing"


def test_duplicate_positions(study):
    folder, files, _ = study
    ds = pydicom.dcmread(files["t1"][4])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.EchoNumbers = 2
    ds.save_as(files["t1"][4].parent / "echo2.dcm")
    assert _code(folder).code == "duplicate_slices"


def test_sheared_stack_is_gantry_tilt(study):
    folder, files, _ = study

    def shear(ds, k):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.3 * z, z]

    _edit(files["t1ce"], shear)
    error = _code(folder)
    assert error.code == "gantry_tilt" and "16.7" in str(error)  # atan(0.3)


def test_gantry_detector_tilt_is_refused(study):
    folder, files, _ = study
    _edit(files["t2"], lambda ds, k: setattr(ds, "GantryDetectorTilt", 12))
    assert _code(folder).code == "gantry_tilt"


def test_inconsistent_pixel_spacing(study):
    folder, files, _ = study
    _edit(files["t1"][2:3], lambda ds, k: setattr(ds, "PixelSpacing", [0.5, 0.5]))
    assert _code(folder).code == "inconsistent_slices"


def test_multiframe_is_skipped_and_refused_when_named(study):
    folder, files, uids = study
    _edit(files["t2"], lambda ds, k: setattr(ds, "NumberOfFrames", 2))
    error = _code(folder)
    assert error.code == "missing_modality" and "multi-frame" in str(error)
    assert _code(folder, overrides={"t2": uids["t2"]}).code == "multiframe"


@pytest.mark.parametrize(
    ("keyword", "code"),
    [("FrameOfReferenceUID", "frame_of_reference_mismatch"), ("PatientID", "patient_mismatch")],
)
def test_series_of_different_frames_or_patients(study, keyword, code):
    folder, files, _ = study
    other = generate_uid()
    _edit(files["flair"], lambda ds, k: setattr(ds, keyword, other))
    error = _code(folder)
    assert error.code == code and other in str(error)


def test_single_slice_is_not_3d(study, phantom):
    folder, files, _ = study
    shutil.rmtree(files["t2"][0].parent)
    images, _, affine = phantom
    write_mr_series(
        images[2][:, :, 9:10], affine, folder / "t2", "t2", study=StudyInfo(patient_id="P1")
    )
    # Same patient, but its own frame of reference: fix that so the slice count decides.
    for_uid = pydicom.dcmread(files["t1"][0]).FrameOfReferenceUID
    _edit(
        list((folder / "t2").iterdir()), lambda ds, k: setattr(ds, "FrameOfReferenceUID", for_uid)
    )
    assert _code(folder).code == "not_3d"


def test_not_dicom_not_found_and_too_large(tmp_path, axial_study):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("hello")
    assert _code(tmp_path / "a").code == "not_dicom"
    assert _code(tmp_path / "missing").code == "not_found"
    (tmp_path / "b.nii.gz").write_bytes(b"\x1f\x8b")
    assert _code(tmp_path / "b.nii.gz").code == "not_dicom"
    assert _code(axial_study[0], max_bytes=10_000).code == "too_large"


def test_scan_groups_series_in_number_order(axial_study):
    series = scan_study(axial_study[0])
    assert [s.number for s in series] == [3, 4, 5, 7]
    assert all(len(s.instances) == SHAPE[2] for s in series)


# --------------------------------------------------------------------------- skull stripping


def test_head_with_skull_gets_a_warning(tmp_path, phantom):
    images, _, affine = phantom
    rng = np.random.default_rng(0)
    head = images.copy()
    head[head == 0] = rng.integers(5, 40, size=int(np.sum(head == 0)))  # air noise, scalp
    write_study(head, affine, tmp_path / "head")
    result = read_dicom_study(tmp_path / "head")
    assert len(result.warnings) == 1 and "skull-stripped" in result.warnings[0]


def test_skull_stripping_warning_thresholds():
    brain = np.zeros((20, 20, 20))
    brain[5:15, 5:15, 5:15] = 1
    assert skull_stripping_warning(brain, np.eye(4)) is None
    assert skull_stripping_warning(brain + 1, np.eye(4)) is None  # constant offset, still zero-like
    assert skull_stripping_warning(np.ones((20, 20, 20)) + np.arange(20), np.eye(4)) is not None
    big = np.diag([15.0, 15.0, 15.0, 1.0])  # 3.375 mL voxels: 3.4 L of "brain"
    assert "mL" in (skull_stripping_warning(brain, big) or "")
