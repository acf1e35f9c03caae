"""Reading the four MRI modalities of a case and writing label maps and probabilities.

A case comes in one of three forms:

* a mapping ``{"t1": path, "t1ce": path, "t2": path, "flair": path}`` of four 3D files
  (the BraTS 2023 names ``t1n``, ``t1c``, ``t2w`` and ``t2f`` are accepted as keys too);
* one 4D file of shape ``(X, Y, Z, 4)`` whose fourth axis holds the modalities in
  :data:`MODALITIES` order (T1, T1ce, T2, FLAIR);
* a BraTS case folder, whose files are found by name (see :func:`find_case_files`).

Every input is validated before any computation and each problem raises
:class:`InputError` with a stable ``code`` and a message that names the file and
modality and says how to fix it. No shape or orientation is assumed: any grid the four
files agree on is accepted, and written outputs carry the reference modality's affine
and header, so they overlay the inputs in any viewer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np

from model.labels import LabelError, to_brats2018

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: Channel order used everywhere: in :class:`Case`, in a 4D input file and in the network.
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")

#: The modality whose header and affine every output copies.
REFERENCE_MODALITY = "t1"

#: BraTS 2023 names of the modalities, accepted as mapping keys and file suffixes.
MODALITY_ALIASES: dict[str, str] = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}

#: File-name endings (before ``.nii`` / ``.nii.gz``) of each modality and of the labels.
#: BraTS 2018-2021 write ``<case>_t1``; BraTS 2023 writes ``<case>-t1n``.
FILE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "t1": ("_t1", "-t1n"),
    "t1ce": ("_t1ce", "-t1c"),
    "t2": ("_t2", "-t2w"),
    "flair": ("_flair", "-t2f"),
}
LABEL_SUFFIXES: tuple[str, ...] = ("_seg", "-seg")

#: Accepted NIfTI file endings: plain, gzip- or bzip2-compressed (nibabel reads all three).
NIFTI_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii.bz2", ".nii")
#: First bytes of each compressed NIfTI ending's container.
_COMPRESSION_MAGIC: dict[str, tuple[bytes, str]] = {
    ".gz": (b"\x1f\x8b", "gzip"),
    ".bz2": (b"BZh", "bzip2"),
}

#: Accepted voxel edge lengths in mm; anything outside is taken as a broken header.
MIN_VOXEL_MM = 0.1
MAX_VOXEL_MM = 10.0

#: Fewest voxels along each axis of a volume to segment (the network's patches need
#: some context; a single slice or a thin crop yields nothing useful).
MIN_VOXELS_PER_AXIS = 16

#: Default tolerance (mm, elementwise on the 4x4 affine) for files to share a grid.
AFFINE_ATOL = 1e-3

#: Every ``InputError.code``.
ERROR_CODES: tuple[str, ...] = (
    "not_found",
    "not_nifti",
    "unreadable",
    "not_3d",
    "not_4d",
    "shape_mismatch",
    "affine_mismatch",
    "bad_affine",
    "non_finite",
    "empty_volume",
    "bad_voxel_size",
    "missing_modality",
    "unknown_modality",
    "ambiguous_files",
    "bad_labels",
    "unsupported_dtype",
    "too_small",
    # DICOM studies (model/dicom_study.py)
    "not_dicom",
    "too_large",
    "unknown_series",
    "ambiguous_series",
    "unsupported_series",
    "derived_series",
    "multiframe",
    "mixed_orientation",
    "inconsistent_slices",
    "duplicate_slices",
    "gantry_tilt",
    "uneven_spacing",
    "frame_of_reference_mismatch",
    "patient_mismatch",
)

#: numpy dtype kinds a volume may be stored as: signed and unsigned integers, floats.
#: Complex, boolean, RGB (structured) and other kinds are refused, not cast.
_VOLUME_KINDS = frozenset("iuf")


class InputError(ValueError):
    """An input file or case cannot be used; the message says why and how to fix it.

    Attributes:
        code: stable snake_case identifier of the problem, one of :data:`ERROR_CODES`.
        path: the offending file or folder, when there is one.
    """

    def __init__(self, code: str, message: str, path: PathLike | None = None) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"code must be one of {ERROR_CODES}, got {code!r}")
        super().__init__(message)
        self.code = code
        self.path = None if path is None else str(path)


@dataclass(frozen=True)
class Case:
    """The four co-registered modalities of one case.

    Attributes:
        images: float32 array ``(4, X, Y, Z)`` in :data:`MODALITIES` order.
        affine: 4x4 voxel-to-world affine shared by the modalities.
        header: copy of the reference file's header (T1, or the 4D file).
        spacing: voxel edge lengths in mm, from the header zooms.
        name: case name (folder name, or file name without modality suffix).
        sources: modality -> file it was read from.
    """

    images: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    spacing: tuple[float, float, float]
    name: str
    sources: dict[str, Path] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The spatial grid ``(X, Y, Z)``."""
        _, x, y, z = self.images.shape
        return int(x), int(y), int(z)


# --------------------------------------------------------------------------- file names


def _split_nifti_name(path: Path) -> tuple[str, str] | None:
    """Returns ``(stem, extension)`` for a NIfTI file name, ``None`` for any other name."""
    lower = path.name.lower()
    for ext in NIFTI_EXTENSIONS:
        if lower.endswith(ext) and len(lower) > len(ext):
            return path.name[: -len(ext)], path.name[-len(ext) :]
    return None


def nifti_stem(path: PathLike) -> str | None:
    """A NIfTI file's name without its ending (``.nii``, ``.nii.gz``, ``.nii.bz2``);
    None for any other name."""
    parts = _split_nifti_name(Path(path))
    return parts[0] if parts else None


def strip_label_suffix(stem: str) -> str:
    """A label file's stem without its ``_seg`` / ``-seg`` ending (the case name)."""
    for suffix in LABEL_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def _match_suffix(stem: str, suffixes: tuple[str, ...]) -> bool:
    # Suffixes are matched at the very end of the stem, so "_t1" never matches "_t1ce".
    lower = stem.lower()
    return any(lower.endswith(s) for s in suffixes)


def _nifti_files(folder: Path) -> dict[Path, str]:
    """The folder's visible NIfTI files, in name order, each with its stem."""
    files: dict[Path, str] = {}
    for p in sorted(folder.iterdir()):
        parts = _split_nifti_name(p)
        if p.is_file() and not p.name.startswith(".") and parts is not None:
            files[p] = parts[0]
    return files


def _check_folder(folder: PathLike) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise InputError(
            "not_found",
            f"case folder {path} does not exist or is not a folder; pass the folder that "
            f"holds the case's {', '.join(MODALITIES)} files",
            path,
        )
    return path


def _match_modalities(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {m: [] for m in MODALITIES}
    for p, stem in _nifti_files(folder).items():
        for modality, suffixes in FILE_SUFFIXES.items():
            if _match_suffix(stem, suffixes):
                found[modality].append(p)
    return found


def _expected_names(modality: str) -> str:
    return " or ".join(f"'<case>{s}.nii.gz'" for s in FILE_SUFFIXES[modality])


def find_case_files(folder: PathLike) -> dict[str, Path]:
    """Finds the four modality files of a BraTS case folder by name.

    Recognised names (``.nii``, ``.nii.gz`` or ``.nii.bz2``): ``<case>_t1``, ``<case>_t1ce``,
    ``<case>_t2``, ``<case>_flair`` (BraTS 2018-2021) and ``<case>-t1n``, ``<case>-t1c``,
    ``<case>-t2w``, ``<case>-t2f`` (BraTS 2023). Matching is case-insensitive and on the
    end of the name, so ``_t1`` never picks up a ``_t1ce`` file. Hidden files are ignored.

    Args:
        folder: the case folder.

    Returns:
        Modality -> file, in :data:`MODALITIES` order.

    Raises:
        InputError: ``not_found`` (no such folder), ``missing_modality`` (a modality has
            no file) or ``ambiguous_files`` (a modality has several files).
    """
    path = _check_folder(folder)
    found = _match_modalities(path)
    missing = [m for m in MODALITIES if not found[m]]
    if missing:
        present = [p.name for p in _nifti_files(path)]
        raise InputError(
            "missing_modality",
            f"case folder {path} has no file for {', '.join(missing)}; expected "
            + "; ".join(f"{m}: {_expected_names(m)}" for m in missing)
            + f". NIfTI files found: {present or 'none'}. Add the missing modality or "
            "rename the files to these conventions",
            path,
        )
    for modality in MODALITIES:
        if len(found[modality]) > 1:
            names = [p.name for p in found[modality]]
            raise InputError(
                "ambiguous_files",
                f"case folder {path} has several {modality} files {names}; keep exactly one",
                path,
            )
    return {m: found[m][0] for m in MODALITIES}


def find_label_file(folder: PathLike) -> Path | None:
    """Finds the label map ``<case>_seg`` / ``<case>-seg`` (``.nii``, ``.nii.gz`` or ``.nii.bz2``).

    Returns:
        The file, or ``None`` when the folder holds no label map.

    Raises:
        InputError: ``not_found`` (no such folder) or ``ambiguous_files``.
    """
    path = _check_folder(folder)
    matches = [p for p, stem in _nifti_files(path).items() if _match_suffix(stem, LABEL_SUFFIXES)]
    if len(matches) > 1:
        raise InputError(
            "ambiguous_files",
            f"case folder {path} has several label maps {[p.name for p in matches]}; "
            "keep exactly one",
            path,
        )
    return matches[0] if matches else None


def find_cases(folder: PathLike) -> list[Path]:
    """Lists the sub-folders of ``folder`` that hold a file for every modality, sorted.

    Raises:
        InputError: ``not_found`` when ``folder`` is not a folder.
    """
    root = _check_folder(folder)
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and all(_match_modalities(p).values())
    )


# --------------------------------------------------------------------------- reading


def _describe(path: Path, modality: str | None) -> str:
    return f"{modality} file {path}" if modality else f"file {path}"


def _open_image(path: Path, modality: str | None) -> nib.Nifti1Image:
    """Opens a NIfTI file's header (the voxel data is read later)."""
    what = _describe(path, modality)
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
    if _split_nifti_name(path) is None:
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


def _check_voxel_size(img: nib.Nifti1Image, path: Path, modality: str | None) -> None:
    what = _describe(path, modality)
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


def _spatial_shape(img: nib.Nifti1Image, path: Path, modality: str | None) -> tuple[int, ...]:
    """The 3D shape, squeezing trailing singleton axes; raises ``not_3d`` otherwise."""
    shape = tuple(int(n) for n in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(
            "not_3d",
            f"{_describe(path, modality)} has shape {tuple(img.shape)}; each modality must "
            "be one 3D volume (a trailing axis of length 1 is allowed). Send each modality "
            "as its own 3D file, or all four as one (X, Y, Z, 4) file",
            path,
        )
    return shape


def _check_size(shape: tuple[int, ...], path: Path, modality: str | None) -> None:
    """Raises ``too_small`` when an axis of the 3D ``shape`` holds fewer than
    :data:`MIN_VOXELS_PER_AXIS` voxels."""
    if min(shape[:3]) < MIN_VOXELS_PER_AXIS:
        raise InputError(
            "too_small",
            f"{_describe(path, modality)} has {' x '.join(str(n) for n in shape[:3])} voxels; "
            f"each axis needs at least {MIN_VOXELS_PER_AXIS} to be segmented (a brain MRI "
            "is about 240 x 240 x 155 at 1 mm). Send the whole 3D volume, not a slice or "
            "a crop",
            path,
        )


def _read_data(img: nib.Nifti1Image, path: Path, modality: str | None) -> np.ndarray:
    try:
        return np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # EOFError, OSError, zlib.error, short buffers, ...
        raise InputError(
            "unreadable",
            f"{_describe(path, modality)} cannot be read ({err}); the file looks truncated "
            "or corrupt, e.g. by an interrupted upload or copy. Send it again",
            path,
        ) from err


def _value_where(path: Path, modality: str, channel: int | None) -> str:
    return (
        f"{modality} file {path}"
        if channel is None
        else f"{modality} (channel {channel}) of {path}"
    )


def _raise_value_problem(
    path: Path, modality: str, channel: int | None, n_bad: int, any_nonzero: bool
) -> None:
    """The value rules of a volume, from its count of non-finite voxels and whether any
    voxel is non-zero (see :func:`_check_values`; :mod:`model.nifti_check` streams them)."""
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


def _check_values(volume: np.ndarray, path: Path, modality: str, channel: int | None) -> None:
    finite = np.isfinite(volume)
    n_bad = int(volume.size - np.count_nonzero(finite))
    _raise_value_problem(path, modality, channel, n_bad, bool(np.any(volume)))


def _check_same_grid(
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


def _normalise_mapping(paths: Mapping[str, PathLike]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for key, value in paths.items():
        modality = MODALITY_ALIASES.get(str(key).lower(), str(key).lower())
        if modality not in MODALITIES:
            raise InputError(
                "unknown_modality",
                f"unknown modality {key!r} (file {value}); use the keys {', '.join(MODALITIES)}",
                value,
            )
        if modality in out:
            raise InputError(
                "ambiguous_files",
                f"two files given for {modality}: {out[modality]} and {value}; give one",
                value,
            )
        out[modality] = Path(value)
    missing = [m for m in MODALITIES if m not in out]
    if missing:
        raise InputError(
            "missing_modality",
            f"no file given for {', '.join(missing)}; a case needs all of {', '.join(MODALITIES)}",
        )
    return {m: out[m] for m in MODALITIES}


def _case_name_from_file(path: Path, suffixes: tuple[str, ...] = ()) -> str:
    stem = _split_nifti_name(path)
    name = stem[0] if stem else path.name
    for s in suffixes:
        if name.lower().endswith(s):
            return name[: -len(s)] or name
    return name


def _spacing(img: nib.Nifti1Image) -> tuple[float, float, float]:
    zooms = img.header.get_zooms()[:3]
    return (float(zooms[0]), float(zooms[1]), float(zooms[2]))


@dataclass(frozen=True)
class CaseLayout:
    """What the headers of a case's files say, every check that needs no voxel passed.

    Attributes:
        files: modality -> file (the same 4D file for every modality of a 4D case).
        images: modality -> opened image (voxel data not read).
        shape: the spatial grid ``(X, Y, Z)``.
        four_d: the modalities are the channels of one ``(X, Y, Z, 4)`` file.
    """

    files: dict[str, Path]
    images: dict[str, nib.Nifti1Image]
    shape: tuple[int, int, int]
    affine: np.ndarray
    header: nib.Nifti1Header
    spacing: tuple[float, float, float]
    name: str
    four_d: bool = False


def _inspect_separate(files: dict[str, Path], name: str, affine_atol: float) -> CaseLayout:
    images: dict[str, nib.Nifti1Image] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for modality, path in files.items():
        img = _open_image(path, modality)
        shapes[modality] = _spatial_shape(img, path, modality)
        _check_size(shapes[modality], path, modality)
        _check_voxel_size(img, path, modality)
        images[modality] = img
    ref = images[REFERENCE_MODALITY]
    ref_what = _describe(files[REFERENCE_MODALITY], REFERENCE_MODALITY)
    for modality in MODALITIES:
        _check_same_grid(
            shapes[REFERENCE_MODALITY],
            ref.affine,
            ref_what,
            shapes[modality],
            images[modality].affine,
            _describe(files[modality], modality),
            files[modality],
            affine_atol,
        )
    x, y, z = shapes[REFERENCE_MODALITY][:3]
    return CaseLayout(
        files=dict(files),
        images=images,
        shape=(x, y, z),
        affine=np.array(ref.affine, dtype=np.float64),
        header=ref.header,
        spacing=_spacing(ref),
        name=name,
    )


def _inspect_4d(path: Path) -> CaseLayout:
    img = _open_image(path, None)
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 5 and shape[3] == 1:  # NIfTI vector layout (X, Y, Z, 1, C)
        shape = shape[:3] + shape[4:]
    if len(shape) != 4 or shape[3] != len(MODALITIES):
        raise InputError(
            "not_4d",
            f"file {path} has shape {tuple(img.shape)}; a single-file case must be 4D with "
            f"shape (X, Y, Z, {len(MODALITIES)}) holding {', '.join(MODALITIES)} in that "
            "order. Otherwise send the four modalities as separate files",
            path,
        )
    _check_size(shape, path, None)
    _check_voxel_size(img, path, None)
    return CaseLayout(
        files={m: path for m in MODALITIES},
        images={m: img for m in MODALITIES},
        shape=(shape[0], shape[1], shape[2]),
        affine=np.array(img.affine, dtype=np.float64),
        header=img.header,
        spacing=_spacing(img),
        name=_case_name_from_file(path),
        four_d=True,
    )


def _read_layout(layout: CaseLayout) -> Case:
    """The voxels of an inspected case, each volume checked by value."""
    stacked = np.empty((len(MODALITIES), *layout.shape), dtype=np.float32)  # (4, X, Y, Z)
    if layout.four_d:
        path = layout.files[REFERENCE_MODALITY]
        img = layout.images[REFERENCE_MODALITY]
        data = _read_data(img, path, None).reshape((*layout.shape, len(MODALITIES)))
        stacked[:] = np.moveaxis(data, -1, 0)
        for c, modality in enumerate(MODALITIES):
            _check_values(stacked[c], path, modality, c)
    else:
        for c, modality in enumerate(MODALITIES):
            path = layout.files[modality]
            volume = _read_data(layout.images[modality], path, modality).reshape(layout.shape)
            _check_values(volume, path, modality, None)
            stacked[c] = volume
    return Case(
        images=stacked,
        affine=layout.affine.copy(),
        header=layout.header.copy(),
        spacing=layout.spacing,
        name=layout.name,
        sources=dict(layout.files),
    )


def inspect_case(
    source: Mapping[str, PathLike] | PathLike,
    *,
    name: str | None = None,
    affine_atol: float = AFFINE_ATOL,
) -> CaseLayout:
    """Every check of :func:`load_case` that needs no voxel data: the files, their
    headers (nibabel's full parsing), shapes, grids and voxel sizes.

    Raises:
        InputError: as :func:`load_case`, except ``non_finite``, ``empty_volume`` and
            ``unreadable`` voxel data, which only reading the voxels can tell.
    """
    if affine_atol < 0 or not np.isfinite(affine_atol):
        raise ValueError(f"affine_atol must be a finite number >= 0, got {affine_atol!r}")
    if isinstance(source, Mapping):
        files = _normalise_mapping(source)
        default = _case_name_from_file(files[REFERENCE_MODALITY], FILE_SUFFIXES["t1"])
        return _inspect_separate(files, name or default, affine_atol)
    path = Path(source)
    if path.is_dir():
        return _inspect_separate(find_case_files(path), name or path.name, affine_atol)
    layout = _inspect_4d(path)
    return replace(layout, name=name) if name else layout


def load_case(
    source: Mapping[str, PathLike] | PathLike,
    *,
    name: str | None = None,
    affine_atol: float = AFFINE_ATOL,
) -> Case:
    """Loads and validates the four modalities of one case.

    Args:
        source: a mapping modality -> 3D file (keys from :data:`MODALITIES` or their
            BraTS 2023 names), a single 4D file ``(X, Y, Z, 4)`` whose fourth axis is in
            :data:`MODALITIES` order, or a BraTS case folder (see :func:`find_case_files`).
        name: the case name; by default the folder name or the T1 file name without its
            modality suffix.
        affine_atol: largest elementwise difference (mm) allowed between the 4x4 affines
            of the modalities.

    Returns:
        The case, with float32 images ``(4, X, Y, Z)``.

    Raises:
        InputError: any problem with the files; ``code`` says which (see
            :data:`ERROR_CODES`).
    """
    case = _read_layout(inspect_case(source, name=name, affine_atol=affine_atol))
    logger.debug("loaded case %s: shape %s, spacing %s", case.name, case.shape, case.spacing)
    return case


def inspect_labels(
    file: Path, like: Case | CaseLayout | None, affine_atol: float = AFFINE_ATOL
) -> tuple[nib.Nifti1Image, tuple[int, ...]]:
    """The checks of a label map that need no voxels: a NIfTI file, one 3D volume, on
    ``like``'s grid when given. Returns the opened image and its 3D shape."""
    img = _open_image(file, "label")
    shape = _spatial_shape(img, file, "label")
    if like is not None:
        _check_same_grid(
            like.shape,
            like.affine,
            f"case {like.name}",
            shape,
            img.affine,
            f"label file {file}",
            file,
            affine_atol,
        )
    return img, shape


def load_labels(
    path: PathLike,
    like: Case | None = None,
    *,
    et_label: int | None = None,
    affine_atol: float = AFFINE_ATOL,
) -> np.ndarray:
    """Reads a label map by value and returns it in the BraTS 2018 convention.

    Integer and float maps are accepted as long as every value is a BraTS label; a map
    that writes ET as 3 (BraTS 2023) is converted to 4.

    Args:
        path: the label file.
        like: when given, the case the labels belong to: shape and affine must match.
        et_label: the value the file uses for ET (4 or 3); ``None`` infers it.
        affine_atol: tolerance (mm) on the affine difference to ``like``.

    Returns:
        uint8 array ``(X, Y, Z)`` with values in {0, 1, 2, 4}.

    Raises:
        InputError: ``not_found``, ``not_nifti``, ``unreadable``, ``not_3d``,
            ``shape_mismatch``, ``affine_mismatch`` or ``bad_labels``.
    """
    file = Path(path)
    what = f"label file {file}"
    img, shape = inspect_labels(file, like, affine_atol)
    try:
        raw = np.asanyarray(img.dataobj).reshape(shape)
    except Exception as err:  # EOFError, OSError, zlib.error, ...
        raise InputError(
            "unreadable",
            f"{what} cannot be read ({err}); the file looks truncated or corrupt. Send it again",
            file,
        ) from err
    try:
        return to_brats2018(raw, et_label=et_label)
    except LabelError as err:
        raise InputError(
            "bad_labels",
            f"{what}: {err}. Send a BraTS label map (0 background, 1 NCR/NET, 2 edema, "
            "4 or 3 enhancing tumour)",
            file,
        ) from err
