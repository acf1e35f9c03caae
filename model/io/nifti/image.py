"""Opening one NIfTI image and checking it: compression, header, voxel size, grid, values.

Every check raises :class:`~model.io.volumes.InputError` naming the file and the
modality; :mod:`model.io.nifti.read` runs them on whole volumes and
:mod:`model.io.nifti.check` on slabs.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from model.io.nifti.files import split_nifti_name
from model.io.volumes import MAX_VOXEL_MM, MIN_VOXEL_MM, MIN_VOXELS_PER_AXIS, InputError

#: First bytes of each compressed NIfTI ending's container.
_COMPRESSION_MAGIC: dict[str, tuple[bytes, str]] = {
    ".gz": (b"\x1f\x8b", "gzip"),
    ".bz2": (b"BZh", "bzip2"),
}


#: numpy dtype kinds a volume may be stored as: signed and unsigned integers, floats.
#: Complex, boolean, RGB (structured) and other kinds are refused, not cast.
_VOLUME_KINDS = frozenset("iuf")


def describe(path: Path, modality: str | None) -> str:
    return f"{modality} file {path}" if modality else f"file {path}"


def open_image(path: Path, modality: str | None) -> nib.Nifti1Image:
    """Opens a NIfTI file's header (the voxel data is read later)."""
    what = describe(path, modality)
    if not path.is_file():
        raise InputError(
            "not_found",
            f"{what} does not exist or is not a file; check the path and send it again",
            path,
        )
    if path.name.lower().endswith((".hdr", ".img", ".hdr.gz", ".img.gz")):
        raise InputError(
            "not_nifti",
            f"{what} is half of a two-file NIfTI/Analyze pair (.hdr/.img); convert the pair "
            "to one .nii.gz file (for example nibabel.save(nibabel.load('x.hdr'), "
            "'x.nii.gz')) and send that",
            path,
        )
    if split_nifti_name(path) is None:
        raise InputError(
            "not_nifti",
            f"{what} is not a NIfTI file: the name must end in .nii, .nii.gz or .nii.bz2; "
            "convert it to NIfTI (e.g. with dcm2niix) and send it again",
            path,
        )
    for ending, (magic, kind) in _COMPRESSION_MAGIC.items():
        if not path.name.lower().endswith(ending):
            continue
        with open(path, "rb") as f:
            head = f.read(len(magic))
        if head != magic:
            raise InputError(
                "not_nifti",
                f"{what} is named .nii{ending} but is not {kind}-compressed NIfTI data; send "
                "the original NIfTI file, or name an uncompressed one .nii",
                path,
            )
    try:
        img = nib.load(path)
    except (EOFError, OSError) as err:
        raise InputError(
            "unreadable",
            f"{what} cannot be read ({err}); the file looks truncated or corrupt, "
            "e.g. by an interrupted upload or copy. Send it again",
            path,
        ) from err
    except Exception as err:  # nibabel raises ImageFileError, HeaderDataError, ...
        if "data code" in str(err):  # a datatype nibabel cannot read, e.g. 1-bit DT_BINARY
            raise InputError(
                "unsupported_dtype",
                f"{what} declares a voxel type that cannot be read ({err}); export it as "
                "int16 or float32 and send it again",
                path,
            ) from err
        raise InputError(
            "not_nifti",
            f"{what} is not a valid NIfTI image ({err}); convert it to NIfTI-1 and send it again",
            path,
        ) from err
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise InputError(
            "not_nifti",
            f"{what} is a {type(img).__name__}, not NIfTI; convert it to NIfTI and send it again",
            path,
        )
    dtype = img.get_data_dtype()
    if dtype.kind not in _VOLUME_KINDS:
        raise InputError(
            "unsupported_dtype",
            f"{what} stores {_dtype_name(dtype)} voxels; MRI intensities and label maps must "
            "be integers or real floating-point numbers. Export the magnitude image as "
            "int16 or float32 and send it again",
            path,
        )
    return img


def _dtype_name(dtype: np.dtype) -> str:
    if dtype.kind == "c":
        return f"complex ({dtype})"
    if dtype.kind == "b":
        return "boolean"
    if dtype.names:
        return f"structured ({', '.join(dtype.names)}; e.g. RGB)"
    return str(dtype)


def _raw_zooms(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    """The spatial pixdims as written in the file.

    nibabel silently replaces zero or negative pixdims by 1 on load; this reads the header
    again without those fixes so that a broken header is reported instead.
    """
    try:
        with nib.openers.ImageOpener(str(path)) as f:
            raw = type(img.header).from_fileobj(f, check=False)
        return np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    except Exception:  # pragma: no cover - the header was read once already
        return np.asarray(img.header.get_zooms()[:3], dtype=np.float64)


def check_voxel_size(img: nib.Nifti1Image, path: Path, modality: str | None) -> None:
    what = describe(path, modality)
    affine = img.affine
    if not np.all(np.isfinite(affine)):
        raise InputError(
            "bad_affine",
            f"{what} has a non-finite voxel-to-world affine {affine.tolist()}; "
            "fix the qform/sform of the file",
            path,
        )
    for source, sizes in (
        ("header pixdim", _raw_zooms(img, path)),
        ("affine", np.linalg.norm(affine[:3, :3], axis=0)),
    ):
        bad = ~np.isfinite(sizes) | (sizes < MIN_VOXEL_MM) | (sizes > MAX_VOXEL_MM)
        if np.any(bad):
            raise InputError(
                "bad_voxel_size",
                f"{what} has voxel sizes {[float(s) for s in sizes]} mm in its {source}; "
                f"each must lie in [{MIN_VOXEL_MM}, {MAX_VOXEL_MM}] mm. The header is "
                "probably broken: re-export the image with correct voxel spacing",
                path,
            )


def spatial_shape(img: nib.Nifti1Image, path: Path, modality: str | None) -> tuple[int, ...]:
    """The 3D shape, squeezing trailing singleton axes; raises ``not_3d`` otherwise."""
    shape = tuple(int(n) for n in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(
            "not_3d",
            f"{describe(path, modality)} has shape {tuple(img.shape)}; each modality must "
            "be one 3D volume (a trailing axis of length 1 is allowed). Send each modality "
            "as its own 3D file, or all four as one (X, Y, Z, 4) file",
            path,
        )
    return shape


def check_size(shape: tuple[int, ...], path: Path, modality: str | None) -> None:
    """Raises ``too_small`` when an axis of the 3D ``shape`` holds fewer than
    :data:`MIN_VOXELS_PER_AXIS` voxels."""
    if min(shape[:3]) < MIN_VOXELS_PER_AXIS:
        raise InputError(
            "too_small",
            f"{describe(path, modality)} has {' x '.join(str(n) for n in shape[:3])} voxels; "
            f"each axis needs at least {MIN_VOXELS_PER_AXIS} to be segmented (a brain MRI "
            "is about 240 x 240 x 155 at 1 mm). Send the whole 3D volume, not a slice or "
            "a crop",
            path,
        )


def read_data(img: nib.Nifti1Image, path: Path, modality: str | None) -> np.ndarray:
    try:
        return np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # EOFError, OSError, zlib.error, short buffers, ...
        raise InputError(
            "unreadable",
            f"{describe(path, modality)} cannot be read ({err}); the file looks truncated "
            "or corrupt, e.g. by an interrupted upload or copy. Send it again",
            path,
        ) from err


def _value_where(path: Path, modality: str, channel: int | None) -> str:
    return (
        f"{modality} file {path}"
        if channel is None
        else f"{modality} (channel {channel}) of {path}"
    )


def raise_value_problem(
    path: Path, modality: str, channel: int | None, n_bad: int, any_nonzero: bool
) -> None:
    """The value rules of a volume, from its count of non-finite voxels and whether any
    voxel is non-zero (see :func:`check_values`; :mod:`model.io.nifti.check` streams them)."""
    where = _value_where(path, modality, channel)
    if n_bad:
        raise InputError(
            "non_finite",
            f"{where} holds {n_bad} NaN or infinite voxels (or values "
            "too large for float32); replace them (e.g. by 0 outside the brain) and send "
            "the file again",
            path,
        )
    if not any_nonzero:
        raise InputError(
            "empty_volume",
            f"{where} is zero everywhere; it is probably the wrong "
            f"file or a failed export. Send a real {modality} scan",
            path,
        )


def check_values(volume: np.ndarray, path: Path, modality: str, channel: int | None) -> None:
    finite = np.isfinite(volume)
    n_bad = int(volume.size - np.count_nonzero(finite))
    raise_value_problem(path, modality, channel, n_bad, bool(np.any(volume)))


def check_same_grid(
    ref_shape: tuple[int, ...],
    ref_affine: np.ndarray,
    ref_what: str,
    shape: tuple[int, ...],
    affine: np.ndarray,
    what: str,
    path: Path,
    affine_atol: float,
) -> None:
    if shape != ref_shape:
        raise InputError(
            "shape_mismatch",
            f"{what} has shape {shape} but {ref_what} has shape {ref_shape}; all files of a "
            "case must share one voxel grid. Resample (co-register) it onto the reference",
            path,
        )
    diff = float(np.max(np.abs(affine - ref_affine)))
    if diff > affine_atol:
        raise InputError(
            "affine_mismatch",
            f"{what} has affine {np.round(affine, 4).tolist()} but {ref_what} has "
            f"{np.round(ref_affine, 4).tolist()} (largest difference {diff:.4g} mm, "
            f"tolerance {affine_atol:g} mm); the images are not on the same grid. "
            "Co-register and resample them onto the reference",
            path,
        )


def voxel_spacing(img: nib.Nifti1Image) -> tuple[float, float, float]:
    zooms = img.header.get_zooms()[:3]
    return (float(zooms[0]), float(zooms[1]), float(zooms[2]))
