"""One series as a checked stack of slices, and its pixel data as a volume (steps 3 and
4 of :mod:`model.io.dicom.study`).
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from model.io.dicom.classify import float_attribute
from model.io.dicom.scan import Instance, SeriesInfo, multi_values
from model.io.volumes import MAX_VOXEL_MM, MIN_VOXEL_MM, InputError

PathLike = str | os.PathLike[str]


#: RAS <-> LPS: negate x and y.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


#: Transfer syntaxes whose pixel data SimpleITK (GDCM) decodes in single-frame series:
#: uncompressed, deflated, big-endian, JPEG (baseline, extended, lossless), JPEG-LS,
#: JPEG 2000 and RLE. Multi-frame images are decoded by pydicom, with the decoders
#: installed (:func:`_decodable`).
SINGLE_FRAME_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.5",
    }
)


#: Largest allowed difference between the image orientation vectors of two slices.
ORIENTATION_TOLERANCE = 1e-4


#: Largest allowed sine of the angle between the slice step and the slice normal.
TILT_TOLERANCE = 1e-3


#: Largest deviation of a slice position from an even grid, as a share of the step.
SPACING_RTOL = 0.01


@dataclass(frozen=True)
class SliceStack:
    """A checked series: its instances in slice order and the grid they form.

    Attributes:
        instances: sorted along the slice normal.
        shape: ``(columns, rows, slices)``.
        affine: the grid's voxel-to-world affine (RAS, mm).
    """

    instances: tuple[Instance, ...]
    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def reference(self) -> tuple[Dataset, ...]:
        """Per slice, the header of the file it is in (for a frame of a multi-frame
        image, the whole file's header, the same for all its frames)."""
        return tuple(inst.source for inst in self.instances)

    @property
    def frames(self) -> tuple[int, ...]:
        """Per slice, its frame number in a multi-frame file; () for single-frame images."""
        if not any(inst.frame for inst in self.instances):
            return ()
        return tuple(inst.frame for inst in self.instances)


def _vector(ds: Dataset, keyword: str, n: int, series: SeriesInfo, where: Path) -> np.ndarray:
    try:
        values = np.asarray(
            [float(str(v)) for v in multi_values(ds.get(keyword))], dtype=np.float64
        )
    except (TypeError, ValueError):
        values = np.zeros(0)
    if values.shape != (n,) or not np.all(np.isfinite(values)):
        raise InputError(
            "unsupported_series",
            f"{series.label()}: an image has no valid {keyword} ({ds.get(keyword)!r}); "
            "without it the slices cannot be placed in space. Export the series again from "
            "the scanner or PACS",
            where,
        )
    return values


def _one_plane(
    series: SeriesInfo, what: str, place: Path
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The orientation, pixel spacing and (rows, columns) that every image of
    ``series`` must share (``mixed_orientation``, ``inconsistent_slices``)."""
    first = series.first
    orientation = _vector(first, "ImageOrientationPatient", 6, series, place)
    spacing = _vector(first, "PixelSpacing", 2, series, place)
    size = (int(first.get("Rows", 0) or 0), int(first.get("Columns", 0) or 0))
    for inst in series.instances:
        ds = inst.header
        other = _vector(ds, "ImageOrientationPatient", 6, series, place)
        if np.max(np.abs(other - orientation)) > ORIENTATION_TOLERANCE:
            raise InputError(
                "mixed_orientation",
                f"{what} mixes image orientations ({np.round(orientation, 4).tolist()} and "
                f"{np.round(other, 4).tolist()}, file {inst.where}): it holds several stacks "
                "(e.g. a localizer or reformats). Export one orientation per series, or "
                "name another series for it",
                place,
            )
        other_size = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        other_spacing = _vector(ds, "PixelSpacing", 2, series, place)
        if other_size != size or np.max(np.abs(other_spacing - spacing)) > 1e-4:
            raise InputError(
                "inconsistent_slices",
                f"{what} mixes image sizes or pixel spacings ({size[0]}x{size[1]} at "
                f"{spacing.tolist()} mm and {other_size[0]}x{other_size[1]} at "
                f"{other_spacing.tolist()} mm, file {inst.where}); a volume needs one grid",
                place,
            )
    return orientation, spacing, size


def _in_plane_axes(
    orientation: np.ndarray, what: str, place: Path
) -> tuple[np.ndarray, np.ndarray]:
    """The unit row and column directions of an ImageOrientationPatient."""
    row_dir, col_dir = orientation[:3], orientation[3:]
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    if abs(float(row_dir @ col_dir)) > 1e-3:
        raise InputError(
            "bad_affine",
            f"{what} has ImageOrientationPatient {orientation.tolist()} whose row and column "
            "directions are not perpendicular; the header is broken",
            place,
        )
    return row_dir, col_dir


def _sorted_slices(
    series: SeriesInfo, normal: np.ndarray, what: str, place: Path
) -> tuple[list[Instance], np.ndarray]:
    """The instances sorted along ``normal`` and their (n, 3) LPS positions; at least
    two, at distinct positions (``not_3d``, ``duplicate_slices``)."""
    positions = {
        id(inst): _vector(inst.header, "ImagePositionPatient", 3, series, place)
        for inst in series.instances
    }
    ordered = sorted(series.instances, key=lambda inst: float(positions[id(inst)] @ normal))
    if len(ordered) < 2:
        raise InputError(
            "not_3d",
            f"{what} has a single slice; each modality must be a 3D volume of at least two slices",
            place,
        )
    p = np.stack([positions[id(inst)] for inst in ordered])
    steps = np.diff(p @ normal)
    if np.min(steps) < 1e-3:
        k = int(np.argmin(steps))
        raise InputError(
            "duplicate_slices",
            f"{what} has several images at one slice position ({ordered[k].where} and "
            f"{ordered[k + 1].where}): it stacks echoes, time points or b-values. Export "
            "one image per slice position, or name another series for it",
            place,
        )
    return ordered, p


def _slice_step(
    p: np.ndarray, normal: np.ndarray, first: Dataset, what: str, place: Path
) -> np.ndarray:
    """The step from one slice to the next: along the normal (``gantry_tilt``) and the
    same everywhere (``uneven_spacing``)."""
    n = len(p)
    step = (p[-1] - p[0]) / (n - 1)
    tilt = float(np.linalg.norm(step - (step @ normal) * normal) / np.linalg.norm(step))
    gantry = float_attribute(first, "GantryDetectorTilt") or 0.0
    if tilt > TILT_TOLERANCE or abs(gantry) > 1e-3:
        degrees = np.degrees(np.arcsin(min(tilt, 1.0))) if tilt > TILT_TOLERANCE else abs(gantry)
        raise InputError(
            "gantry_tilt",
            f"{what} is a tilted (sheared) stack: its slices are offset in-plane along the "
            f"stack by {degrees:.2f} degrees. Its voxels are not on a rectangular grid; "
            "correct the tilt first (e.g. dcm2niix corrects gantry tilt) or name another "
            "series",
            place,
        )
    spacing_z = float(step @ normal)
    expected = p[0] + np.arange(n)[:, None] * step
    deviation = float(np.max(np.linalg.norm(p - expected, axis=1)))
    if deviation > SPACING_RTOL * spacing_z:
        steps = np.diff(p @ normal)
        raise InputError(
            "uneven_spacing",
            f"{what} has unevenly spaced slices (steps from {np.min(steps):.4g} to "
            f"{np.max(steps):.4g} mm, mean {spacing_z:.4g} mm): slices are missing or the "
            "series mixes slabs. Export the complete series",
            place,
        )
    return step


def _transfer_syntax(inst: Instance) -> str:
    meta = getattr(inst.source, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""


def _decodable(syntax: str, multiframe: bool) -> bool:
    """Whether pixel data stored in transfer syntax ``syntax`` can be decoded here:
    by SimpleITK (single-frame images) or by pydicom with its installed decoders
    (multi-frame images)."""
    if not syntax:
        return True  # no file meta: read as implicit little endian, as pydicom does
    if not multiframe:
        return syntax in SINGLE_FRAME_SYNTAXES
    try:
        return bool(pydicom.pixels.get_decoder(syntax).is_available)
    except NotImplementedError:
        return False


def _check_decodable(series: SeriesInfo, what: str, place: Path) -> None:
    """Every image's transfer syntax can be decoded (``unsupported_series``)."""
    for inst in series.instances:
        syntax = _transfer_syntax(inst)
        if not _decodable(syntax, bool(inst.frame)):
            name = getattr(pydicom.uid.UID(syntax), "name", syntax)
            raise InputError(
                "unsupported_series",
                f"{what}: the pixel data of {inst.where} are stored as {name} ({syntax}), "
                "which cannot be decoded here. Send the series uncompressed (Explicit VR "
                "Little Endian) or JPEG-LS, JPEG 2000 or RLE lossless",
                place,
            )


def slice_stack(series: SeriesInfo, modality: str, where: PathLike = "") -> SliceStack:
    """Checks a series' geometry and sorts its slices (module docstring, step 3).

    Raises:
        InputError: ``mixed_orientation``, ``inconsistent_slices``,
            ``duplicate_slices``, ``gantry_tilt``, ``uneven_spacing``, ``not_3d``,
            ``bad_voxel_size`` or ``unsupported_series`` (no geometry, or pixel data in
            a transfer syntax that cannot be decoded).
    """
    place = Path(where)
    what = f"{modality} {series.label()}"
    _check_decodable(series, what, place)
    orientation, spacing, size = _one_plane(series, what, place)
    row_dir, col_dir = _in_plane_axes(orientation, what, place)
    normal = np.cross(row_dir, col_dir)
    ordered, p = _sorted_slices(series, normal, what, place)
    step = _slice_step(p, normal, series.first, what, place)
    sizes = [float(spacing[1]), float(spacing[0]), float(step @ normal)]
    if any(not MIN_VOXEL_MM <= s <= MAX_VOXEL_MM for s in sizes):
        raise InputError(
            "bad_voxel_size",
            f"{what} has voxel sizes {sizes} mm; each must lie in [{MIN_VOXEL_MM}, "
            f"{MAX_VOXEL_MM}] mm",
            place,
        )
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # along a row: the column index, x
    lps[:3, 1] = col_dir * spacing[0]  # down a column: the row index, y
    lps[:3, 2] = step
    lps[:3, 3] = p[0]
    return SliceStack(tuple(ordered), (size[1], size[0], len(ordered)), _RAS_TO_LPS @ lps)


def read_volume(stack: SliceStack, what: str, where: Path) -> np.ndarray:
    """The stack's voxels ``(columns, rows, slices)`` as float32 (rescale slope and
    intercept applied): single-frame images decoded by SimpleITK, frames of multi-frame
    images by pydicom."""
    if any(inst.frame for inst in stack.instances):
        return _read_frames(stack, what, where)
    import SimpleITK as sitk  # noqa: N813 (the library's own abbreviation)

    with tempfile.TemporaryDirectory(prefix="omnet-dicom-") as tmp:
        files = []
        archives: dict[Path, zipfile.ZipFile] = {}
        try:
            for k, inst in enumerate(stack.instances):
                if inst.member is None:
                    files.append(str(inst.path))
                    continue
                if inst.path not in archives:
                    archives[inst.path] = zipfile.ZipFile(inst.path)
                target = Path(tmp) / f"{k:05d}.dcm"  # our own name, never the member's
                target.write_bytes(archives[inst.path].read(inst.member))
                files.append(str(target))
        finally:
            for archive in archives.values():
                archive.close()
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        try:
            image = reader.Execute()
        except RuntimeError as err:
            raise InputError(
                "unreadable",
                f"the pixel data of {what} cannot be decoded "
                f"({str(err).strip().splitlines()[-1]}); "
                "export it uncompressed or with a standard transfer syntax",
                where,
            ) from err
    volume = sitk.GetArrayFromImage(image)  # (slices, rows, columns)
    expected = stack.shape[::-1]
    if volume.shape != expected:
        raise InputError(
            "inconsistent_slices",
            f"{what} decodes to shape {volume.shape[::-1]}, its headers say {stack.shape}",
            where,
        )
    return np.ascontiguousarray(volume.transpose(2, 1, 0), dtype=np.float32)


def _read_frames(stack: SliceStack, what: str, where: Path) -> np.ndarray:
    """The voxels of a stack of frames of multi-frame images, decoded by pydicom, each
    frame rescaled by its own slope and intercept (PixelValueTransformationSequence)."""
    volume = np.empty(stack.shape, dtype=np.float32)
    files: dict[tuple[Path, str | None], list[tuple[int, Instance]]] = {}
    for z, inst in enumerate(stack.instances):
        files.setdefault((inst.path, inst.member), []).append((z, inst))
    for (path, member), frames in files.items():
        try:
            if member is None:
                ds = pydicom.dcmread(path)
            else:
                with zipfile.ZipFile(path) as archive:
                    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(archive.read(member)))
            pixels = np.asarray(pydicom.pixels.pixel_array(ds))
        except Exception as err:  # any decoder's failure: the file's data are unusable
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else "no reason given"
            raise InputError(
                "unreadable",
                f"the pixel data of {what} cannot be decoded ({frames[0][1].where}: "
                f"{reason}); export it uncompressed or with a standard transfer syntax",
                where,
            ) from err
        pixels = pixels.reshape(-1, *pixels.shape[-2:])  # (frames, rows, columns)
        for z, inst in frames:
            if inst.frame > pixels.shape[0] or pixels.shape[1:] != stack.shape[1::-1]:
                raise InputError(
                    "inconsistent_slices",
                    f"{what}: {inst.where} decodes to {pixels.shape[0]} frames of "
                    f"{pixels.shape[1]}x{pixels.shape[2]}, its headers say otherwise",
                    where,
                )
            slope = float_attribute(inst.header, "RescaleSlope")
            intercept = float_attribute(inst.header, "RescaleIntercept")
            frame = pixels[inst.frame - 1].astype(np.float64)
            frame = frame * (1.0 if slope is None else slope) + (intercept or 0.0)
            volume[:, :, z] = frame.T
    return volume
