"""Tests for model/io/nifti/read.py: tiny synthetic NIfTI files written to tmp_path."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from model.io.nifti.files import find_case_files, find_cases, find_label_file
from model.io.nifti.read import load_case, load_labels
from model.io.nifti.write import save_labels, save_probabilities
from model.io.volumes import ERROR_CODES, MODALITIES, Case, InputError
from model.labels import EDEMA, ENHANCING, ENHANCING_2023, NCR_NET

SHAPE = (16, 17, 18)
NAMES_2018 = {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair"}
NAMES_2023 = {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f"}


def _volumes(shape: tuple[int, ...] = SHAPE) -> dict[str, np.ndarray]:
    """Four int16 volumes, zero on the border, modality c holding values 100 * (c + 1) + k."""
    rng = np.random.default_rng(0)
    out = {}
    for c, m in enumerate(MODALITIES):
        vol = np.zeros(shape, dtype=np.int16)
        vol[1:-1, 1:-1, 1:-1] = 100 * (c + 1) + rng.integers(0, 50, vol[1:-1, 1:-1, 1:-1].shape)
        out[m] = vol
    return out


def _write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    affine = np.eye(4) if affine is None else affine
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code="scanner")
    img.header.set_sform(affine, code="scanner")
    nib.save(img, path)
    return path


def _write_case(
    folder: Path,
    name: str = "case1",
    names: dict[str, str] = NAMES_2018,
    volumes: dict[str, np.ndarray] | None = None,
    affines: dict[str, np.ndarray] | None = None,
) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    volumes = volumes or _volumes()
    affines = affines or {}
    return {
        m: _write(folder / f"{name}{names[m]}.nii.gz", volumes[m], affines.get(m))
        for m in MODALITIES
    }


@contextmanager
def _expect(code: str, *needles: str) -> Iterator[None]:
    """Asserts that the block raises InputError ``code`` with ``needles`` in its message."""
    assert code in ERROR_CODES
    with pytest.raises(InputError) as info:
        yield
    assert info.value.code == code, f"code {info.value.code!r}, expected {code!r}: {info.value}"
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in message: {info.value}"


# --------------------------------------------------------------------------- good inputs


def test_four_files_load_in_modality_order(tmp_path: Path) -> None:
    volumes = _volumes()
    affine = np.diag([0.9, 1.1, 2.0, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 3.0)
    files = _write_case(tmp_path, affines={m: affine for m in MODALITIES}, volumes=volumes)
    # Pass the mapping in an order other than MODALITIES: the case must not care.
    case = load_case({m: files[m] for m in reversed(MODALITIES)})
    assert isinstance(case, Case)
    assert case.images.shape == (4, *SHAPE)
    assert case.images.dtype == np.float32
    for c, m in enumerate(MODALITIES):
        np.testing.assert_array_equal(case.images[c], volumes[m])
    np.testing.assert_allclose(case.affine, affine, atol=1e-6)
    assert case.spacing == pytest.approx((0.9, 1.1, 2.0))
    assert isinstance(case.header, nib.Nifti1Header)
    assert case.name == "case1"
    assert case.sources == files
    assert case.shape == SHAPE


def test_four_files_accept_2023_keys(tmp_path: Path) -> None:
    files = _write_case(tmp_path)
    case = load_case(
        {"t1n": files["t1"], "t1c": files["t1ce"], "t2w": files["t2"], "t2f": files["flair"]}
    )
    assert case.images[1].max() == _volumes()["t1ce"].max()


def test_4d_file_channels_are_modalities(tmp_path: Path) -> None:
    volumes = _volumes()
    stacked = np.stack([volumes[m] for m in MODALITIES], axis=-1)  # (X, Y, Z, 4)
    path = _write(tmp_path / "multi.nii.gz", stacked)
    case = load_case(path)
    assert case.images.shape == (4, *SHAPE)
    for c, m in enumerate(MODALITIES):
        np.testing.assert_array_equal(case.images[c], volumes[m])
    assert case.name == "multi"
    assert set(case.sources.values()) == {path}


def test_4d_file_with_three_channels_is_refused(tmp_path: Path) -> None:
    stacked = np.stack([_volumes()[m] for m in MODALITIES[:3]], axis=-1)
    path = _write(tmp_path / "three.nii.gz", stacked)
    with _expect("not_4d", str(path), "(16, 17, 18, 3)"):
        load_case(path)


@pytest.mark.parametrize("names", [NAMES_2018, NAMES_2023], ids=["brats2018", "brats2023"])
def test_folder_finds_files_by_name(tmp_path: Path, names: dict[str, str]) -> None:
    folder = tmp_path / "BraTS-GLI-00001-000"
    files = _write_case(folder, name=folder.name, names=names)
    _write(
        folder / f"{folder.name}{'_seg' if names is NAMES_2018 else '-seg'}.nii.gz",
        np.zeros(SHAPE, np.uint8),
    )
    assert find_case_files(folder) == files
    case = load_case(folder)
    assert case.name == folder.name
    np.testing.assert_array_equal(case.images[3], _volumes()["flair"])
    assert find_label_file(folder) is not None
    assert find_label_file(folder).name.startswith(folder.name)


def test_t1_does_not_match_t1ce(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    volumes = _volumes()
    # Write t1ce first so a careless "contains _t1" match would take it for T1.
    folder.mkdir()
    for m in ("t1ce", "flair", "t2", "t1"):
        _write(folder / f"c_{m}.nii", volumes[m])
    files = find_case_files(folder)
    assert files["t1"].name == "c_t1.nii"
    assert files["t1ce"].name == "c_t1ce.nii"
    case = load_case(folder)
    np.testing.assert_array_equal(case.images[0], volumes["t1"])
    np.testing.assert_array_equal(case.images[1], volumes["t1ce"])


def test_find_cases_lists_case_folders_sorted(tmp_path: Path) -> None:
    _write_case(tmp_path / "b_case", name="b_case")
    _write_case(tmp_path / "a_case", name="a_case", names=NAMES_2023)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme_t1.txt").write_text("x")
    (tmp_path / "file.txt").write_text("x")
    assert find_cases(tmp_path) == [tmp_path / "a_case", tmp_path / "b_case"]


def test_find_label_file_absent_is_none(tmp_path: Path) -> None:
    _write_case(tmp_path)
    assert find_label_file(tmp_path) is None


def test_trailing_singleton_axis_is_squeezed(tmp_path: Path) -> None:
    volumes = {m: v[..., None] for m, v in _volumes().items()}  # (X, Y, Z, 1)
    _write_case(tmp_path, volumes=volumes)
    assert load_case(tmp_path).images.shape == (4, *SHAPE)


def test_affine_within_tolerance_is_accepted(tmp_path: Path) -> None:
    shifted = np.eye(4)
    shifted[0, 3] = 1e-4
    case = load_case(_write_case(tmp_path, affines={"flair": shifted}))
    np.testing.assert_array_equal(case.affine, np.eye(4))  # the reference is T1


# --------------------------------------------------------------------------- bad inputs


def test_missing_modality_in_folder(tmp_path: Path) -> None:
    files = _write_case(tmp_path)
    files["flair"].unlink()
    with _expect("missing_modality", "flair", str(tmp_path), "_flair"):
        load_case(tmp_path)


def test_missing_modality_in_mapping(tmp_path: Path) -> None:
    files = _write_case(tmp_path)
    del files["t2"]
    with _expect("missing_modality", "t2"):
        load_case(files)


def test_unknown_modality_key(tmp_path: Path) -> None:
    files = _write_case(tmp_path)
    files["pd"] = files["t1"]
    with _expect("unknown_modality", "'pd'"):
        load_case(files)


def test_two_files_for_one_modality(tmp_path: Path) -> None:
    _write_case(tmp_path)
    _write(tmp_path / "case1_t2.nii", _volumes()["t2"])
    with _expect("ambiguous_files", "t2", "case1_t2.nii"):
        load_case(tmp_path)


def test_missing_file(tmp_path: Path) -> None:
    files = _write_case(tmp_path)
    files["t1ce"] = tmp_path / "nowhere_t1ce.nii.gz"
    with _expect("not_found", "t1ce", "nowhere_t1ce.nii.gz"):
        load_case(files)


def test_text_file_named_nii_gz_is_not_nifti(tmp_path: Path) -> None:
    files = _write_case(tmp_path)
    files["t2"].write_text("this is not an image\n")
    with _expect("not_nifti", "t2", str(files["t2"])):
        load_case(tmp_path)


def test_gzipped_garbage_is_not_nifti(tmp_path: Path) -> None:
    files = _write_case(tmp_path)
    files["t2"].write_bytes(gzip.compress(b"not an image" * 40))
    with _expect("not_nifti", "t2", str(files["t2"])):
        load_case(tmp_path)


def test_wrong_extension_is_not_nifti(tmp_path: Path) -> None:
    files = _write_case(tmp_path)
    files["t1"] = tmp_path / "t1.png"
    files["t1"].write_bytes(b"\x89PNG")
    with _expect("not_nifti", "t1", "t1.png", ".nii.gz"):
        load_case(files)


def test_truncated_gzip_is_unreadable(tmp_path: Path) -> None:
    files = _write_case(tmp_path, volumes=_volumes((20, 20, 20)))
    data = files["flair"].read_bytes()
    files["flair"].write_bytes(data[: len(data) // 2])
    with _expect("unreadable", "flair", str(files["flair"]), "truncated"):
        load_case(tmp_path)


def test_truncated_uncompressed_is_unreadable(tmp_path: Path) -> None:
    path = _write(tmp_path / "c_t1.nii", _volumes()["t1"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    files = _write_case(tmp_path)
    files["t1"] = path
    with _expect("unreadable", "t1", "c_t1.nii"):
        load_case(files)


def test_2d_image_is_not_3d(tmp_path: Path) -> None:
    volumes = _volumes()
    volumes["t1ce"] = volumes["t1ce"][:, :, 2]
    _write_case(tmp_path, volumes=volumes)
    with _expect("not_3d", "t1ce", "(16, 17)"):
        load_case(tmp_path)


def test_4d_modality_file_is_not_3d(tmp_path: Path) -> None:
    volumes = _volumes()
    volumes["t2"] = np.stack([volumes["t2"]] * 2, axis=-1)
    _write_case(tmp_path, volumes=volumes)
    with _expect("not_3d", "t2", "(16, 17, 18, 2)"):
        load_case(tmp_path)


@pytest.mark.parametrize("shape", [(48, 48, 1), (16, 15, 18), (3, 17, 18)])
def test_a_volume_too_small_to_segment_is_refused(tmp_path: Path, shape) -> None:
    _write_case(tmp_path, volumes=_volumes(shape))
    size = " x ".join(map(str, shape))
    with _expect("too_small", "t1 file", f"{size} voxels", "at least 16"):
        load_case(tmp_path)
    stacked = np.stack([v for v in _volumes(shape).values()], axis=-1)  # (X, Y, Z, 4)
    path = _write(tmp_path / "multi.nii.gz", stacked)
    with _expect("too_small", str(path), f"{size} voxels"):
        load_case(path)


def test_sixteen_voxels_per_axis_are_enough(tmp_path: Path) -> None:
    _write_case(tmp_path, volumes=_volumes((16, 16, 16)))
    assert load_case(tmp_path).shape == (16, 16, 16)


def test_shape_mismatch_names_shapes_and_files(tmp_path: Path) -> None:
    volumes = _volumes()
    volumes["flair"] = _volumes((16, 17, 17))["flair"]
    files = _write_case(tmp_path, volumes=volumes)
    with _expect(
        "shape_mismatch", "(16, 17, 17)", "(16, 17, 18)", files["flair"].name, files["t1"].name
    ):
        load_case(tmp_path)


def test_affine_mismatch(tmp_path: Path) -> None:
    shifted = np.eye(4)
    shifted[1, 3] = 0.01
    files = _write_case(tmp_path, affines={"t2": shifted})
    with _expect("affine_mismatch", "t2", files["t2"].name, "0.01"):
        load_case(tmp_path)
    assert load_case(tmp_path, affine_atol=0.02).shape == SHAPE


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values(tmp_path: Path, bad: float) -> None:
    volumes = {m: v.astype(np.float32) for m, v in _volumes().items()}
    volumes["t1ce"][2, 3, 2] = bad
    _write_case(tmp_path, volumes=volumes)
    with _expect("non_finite", "t1ce", "case1_t1ce.nii.gz"):
        load_case(tmp_path)


def test_all_zero_modality(tmp_path: Path) -> None:
    volumes = _volumes()
    volumes["flair"] = np.zeros(SHAPE, dtype=np.int16)
    _write_case(tmp_path, volumes=volumes)
    with _expect("empty_volume", "flair", "case1_flair.nii.gz"):
        load_case(tmp_path)


def test_all_zero_channel_of_4d_file(tmp_path: Path) -> None:
    volumes = _volumes()
    volumes["t2"][:] = 0
    path = _write(tmp_path / "multi.nii.gz", np.stack([volumes[m] for m in MODALITIES], -1))
    with _expect("empty_volume", "t2", "channel 2", "multi.nii.gz"):
        load_case(path)


def test_zero_voxel_size_in_pixdim(tmp_path: Path) -> None:
    files = _write_case(tmp_path)
    img = nib.Nifti1Image(_volumes()["t2"], None)  # qform/sform unset: pixdim is the grid
    img.header["pixdim"][1:4] = (1.0, 0.0, 1.0)
    img.header.set_qform(None, code="unknown")
    img.header.set_sform(None, code="unknown")
    nib.save(img, files["t2"])  # nibabel would silently read 0 as 1
    with _expect("bad_voxel_size", "t2", "0.0", files["t2"].name):
        load_case(tmp_path, affine_atol=10.0)


def test_zero_voxel_size_in_affine(tmp_path: Path) -> None:
    files = _write_case(tmp_path)
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    header.set_data_dtype(np.int16)
    header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code="aligned")  # a flat grid
    nib.save(nib.Nifti1Image(_volumes()["t1"], None, header=header), files["t1"])
    with _expect("bad_voxel_size", "t1", "affine", files["t1"].name):
        load_case(tmp_path)


def test_50mm_voxel_size(tmp_path: Path) -> None:
    huge = np.diag([50.0, 1.0, 1.0, 1.0])
    files = _write_case(tmp_path, affines={m: huge for m in MODALITIES})
    with _expect("bad_voxel_size", "t1", "50.0", files["t1"].name):
        load_case(tmp_path)


def test_input_error_is_value_error_with_code() -> None:
    err = InputError("not_3d", "msg", "/x.nii")
    assert isinstance(err, ValueError)
    assert (err.code, err.path, str(err)) == ("not_3d", "/x.nii", "msg")
    with pytest.raises(ValueError, match="code must be one of"):
        InputError("oops", "msg")


# --------------------------------------------------------------------------- labels


def _label_map() -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[1:5, 1:6, 1:4] = EDEMA
    labels[2:4, 2:5, 2] = ENHANCING
    labels[3, 3, 2] = NCR_NET
    return labels


def test_float_label_map_read_by_value(tmp_path: Path) -> None:
    labels = _label_map()
    path = _write(tmp_path / "seg.nii.gz", labels.astype(np.float32))
    out = load_labels(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, labels)


def test_int16_label_map_read_by_value(tmp_path: Path) -> None:
    labels = _label_map()
    path = _write(tmp_path / "seg.nii", labels.astype(np.int16))
    np.testing.assert_array_equal(load_labels(path), labels)


def test_2023_label_map_converted(tmp_path: Path) -> None:
    labels = _label_map()
    as_2023 = labels.copy()
    as_2023[labels == ENHANCING] = ENHANCING_2023
    path = _write(tmp_path / "seg.nii.gz", as_2023)
    np.testing.assert_array_equal(load_labels(path), labels)


def test_bad_label_values(tmp_path: Path) -> None:
    labels = _label_map()
    labels[0, 0, 0] = 7
    path = _write(tmp_path / "seg.nii.gz", labels)
    with _expect("bad_labels", "seg.nii.gz", "[7]"):
        load_labels(path)


def test_labels_checked_against_case(tmp_path: Path) -> None:
    case = load_case(_write_case(tmp_path / "c"))
    small = _write(tmp_path / "small.nii.gz", np.zeros((16, 17, 17), np.uint8))
    with _expect("shape_mismatch", "small.nii.gz", "(16, 17, 17)"):
        load_labels(small, like=case)
    moved = np.eye(4)
    moved[2, 3] = 5.0
    shifted = _write(tmp_path / "moved.nii.gz", _label_map(), moved)
    with _expect("affine_mismatch", "moved.nii.gz"):
        load_labels(shifted, like=case)
    good = _write(tmp_path / "good.nii.gz", _label_map())
    np.testing.assert_array_equal(load_labels(good, like=case), _label_map())


def _oblique_lps_affine() -> np.ndarray:
    """Permuted axes, LPS flips, a 20/10 degree oblique rotation, anisotropic voxels."""
    a, b = np.deg2rad(20.0), np.deg2rad(10.0)
    rot_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    perm = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=np.float64)
    flips = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = flips @ rot_z @ rot_x @ perm @ np.diag([0.9, 1.2, 3.0])
    affine[:3, 3] = (12.5, -30.25, 7.0)
    return affine


def test_non_ras_oblique_affine_round_trips(tmp_path: Path) -> None:
    affine = _oblique_lps_affine()
    folder = tmp_path / "obl"
    folder.mkdir()
    for m, vol in _volumes().items():
        img = nib.Nifti1Image(vol, affine)
        img.header.set_qform(affine, code="scanner")
        img.header.set_sform(affine, code="aligned")
        nib.save(img, folder / f"obl_{m}.nii.gz")
    source = nib.load(folder / "obl_t1.nii.gz")
    case = load_case(folder)
    np.testing.assert_allclose(case.affine, affine, atol=1e-4)

    out = save_labels(_label_map(), case, tmp_path / "out" / "labels.nii.gz")
    written = nib.load(out)
    np.testing.assert_array_equal(written.affine, source.affine)
    np.testing.assert_array_equal(written.header.get_qform(), source.header.get_qform())
    np.testing.assert_array_equal(written.header.get_sform(), source.header.get_sform())
    assert int(written.header["qform_code"]) == 1
    assert int(written.header["sform_code"]) == 2
    assert written.shape == SHAPE
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), _label_map())
    slope, inter = written.header.get_slope_inter()
    assert slope in (None, 1.0) and inter in (None, 0.0)
    np.testing.assert_array_equal(load_labels(out, like=case), _label_map())


def test_save_labels_from_4d_case_is_3d(tmp_path: Path) -> None:
    volumes = _volumes()
    path = _write(tmp_path / "multi.nii.gz", np.stack([volumes[m] for m in MODALITIES], -1))
    case = load_case(path)
    written = nib.load(save_labels(_label_map(), case, tmp_path / "seg.nii"))
    assert written.shape == SHAPE
    assert written.header["dim"][0] == 3


def test_save_labels_with_2023_et(tmp_path: Path) -> None:
    case = load_case(_write_case(tmp_path / "c"))
    out = save_labels(_label_map(), case, tmp_path / "seg.nii.gz", et_label=ENHANCING_2023)
    raw = np.asanyarray(nib.load(out).dataobj)
    assert set(np.unique(raw).tolist()) == {0, NCR_NET, EDEMA, ENHANCING_2023}
    np.testing.assert_array_equal(load_labels(out), _label_map())


def test_save_labels_rejects_bad_input(tmp_path: Path) -> None:
    case = load_case(_write_case(tmp_path / "c"))
    with pytest.raises(ValueError, match="shape"):
        save_labels(np.zeros((16, 17, 17), np.uint8), case, tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match=r"\.nii"):
        save_labels(_label_map(), case, tmp_path / "a.png")
    bad = _label_map()
    bad[0, 0, 0] = ENHANCING_2023  # 3 is not a 2018-convention label
    with pytest.raises(ValueError):
        save_labels(bad, case, tmp_path / "a.nii.gz")
    assert not list(tmp_path.glob("*.nii*")) and not list(tmp_path.glob(".*"))


def test_save_probabilities_is_float32_4d(tmp_path: Path) -> None:
    case = load_case(_write_case(tmp_path / "c"))
    probs = np.random.default_rng(1).random((3, *SHAPE))
    out = save_probabilities(probs, case, tmp_path / "probs.nii.gz")
    written = nib.load(out)
    assert written.shape == (*SHAPE, 3)
    assert written.get_data_dtype() == np.float32
    np.testing.assert_array_equal(written.affine, nib.load(case.sources["t1"]).affine)
    np.testing.assert_allclose(np.moveaxis(written.get_fdata(), -1, 0), probs, rtol=1e-6)
    with pytest.raises(ValueError, match="probs"):
        save_probabilities(probs[0], case, tmp_path / "p.nii.gz")


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    case = load_case(_write_case(tmp_path / "c"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    save_labels(_label_map(), case, out_dir / "seg.nii.gz")
    save_labels(_label_map(), case, out_dir / "seg.nii.gz")  # overwrite in place
    save_probabilities(np.zeros((2, *SHAPE)), case, out_dir / "p.nii")
    assert sorted(p.name for p in out_dir.iterdir()) == ["p.nii", "seg.nii.gz"]


# --------------------------------------------------------------------------- real data


@pytest.mark.data
def test_real_brats_case(brats_case_dir: Path, tmp_path: Path) -> None:
    case = load_case(brats_case_dir)
    assert case.name == brats_case_dir.name
    assert case.images.ndim == 4 and case.images.shape[0] == len(MODALITIES)
    assert case.images.dtype == np.float32
    assert all(np.any(case.images[c]) for c in range(len(MODALITIES)))
    label_file = find_label_file(brats_case_dir)
    assert label_file is not None
    labels = load_labels(label_file, like=case)
    assert set(np.unique(labels).tolist()) <= {0, NCR_NET, EDEMA, ENHANCING}
    assert np.any(labels)
    out = save_labels(labels, case, tmp_path / "seg.nii.gz")
    source, written = nib.load(label_file), nib.load(out)
    np.testing.assert_array_equal(written.affine, source.affine)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels)


# --------------------------------------------------------------------------- .nii.bz2


def _to_bz2(path: Path) -> Path:
    """Re-compresses a .nii.gz file as .nii.bz2 (the original is removed)."""
    import bz2

    target = path.with_name(path.name[: -len(".nii.gz")] + ".nii.bz2")
    target.write_bytes(bz2.compress(gzip.decompress(path.read_bytes())))
    path.unlink()
    return target


def test_bz2_case_folder_is_found_and_loads_like_gz(tmp_path: Path) -> None:
    gz = load_case(_write_case(tmp_path / "gz" / "case1"))
    paths = _write_case(tmp_path / "bz" / "case1")
    for path in paths.values():
        _to_bz2(path)
    label = _write(tmp_path / "bz" / "case1" / "case1_seg.nii.gz", np.zeros(SHAPE, np.uint8))
    label = _to_bz2(label)

    assert find_cases(tmp_path / "bz") == [tmp_path / "bz" / "case1"]
    assert find_label_file(tmp_path / "bz" / "case1") == label
    case = load_case(tmp_path / "bz" / "case1")
    assert case.name == "case1"
    assert all(str(p).endswith(".nii.bz2") for p in case.sources.values())
    np.testing.assert_array_equal(case.images, gz.images)
    assert load_labels(label, like=case).shape == SHAPE


def test_bz2_file_that_is_not_bzip2_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "case1_t1.nii.bz2"
    bad.write_bytes(gzip.compress(b"not bzip2"))
    with _expect("not_nifti", "bzip2"):
        load_labels(bad)


def test_labels_can_be_written_as_bz2(tmp_path: Path) -> None:
    case = load_case(_write_case(tmp_path / "case1"))
    labels = np.zeros(SHAPE, np.uint8)
    labels[2, 2, 2] = ENHANCING
    out = save_labels(labels, case, tmp_path / "out" / "case1_seg.nii.bz2")
    assert out.read_bytes()[:3] == b"BZh"
    np.testing.assert_array_equal(load_labels(out), labels)


@pytest.mark.parametrize(
    ("dtype", "needle"),
    [(np.complex64, "complex"), (np.complex128, "complex")],
)
def test_non_real_voxel_types_are_refused_not_cast(tmp_path: Path, dtype, needle) -> None:
    paths = _write_case(tmp_path / "case1")
    data = _volumes()["t1ce"].astype(dtype)
    img = nib.Nifti1Image(data, np.eye(4))
    nib.save(img, paths["t1ce"])
    with _expect("unsupported_dtype", needle, "t1ce"):
        load_case(tmp_path / "case1")
    with _expect("unsupported_dtype", needle):
        load_labels(paths["t1ce"])


def test_rgb_voxels_are_refused(tmp_path: Path) -> None:
    paths = _write_case(tmp_path / "case1")
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = 10
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), paths["flair"])
    with _expect("unsupported_dtype", "structured"):
        load_case(tmp_path / "case1")


def test_one_bit_binary_voxels_are_refused(tmp_path: Path) -> None:
    # NIfTI's boolean type (DT_BINARY, 1 bit per voxel), which nibabel cannot read.
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    header["datatype"], header["bitpix"], header["vox_offset"] = 1, 1, 352
    path = tmp_path / "mask.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\xff" * 64)
    with _expect("unsupported_dtype", "voxel type"):
        load_labels(path)
