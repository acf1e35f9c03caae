"""PNG previews of a segmentation: three orthogonal slices with the labels overlaid.

:func:`render_preview` draws one MRI modality in grey with the tumour labels blended
over it, as three panels side by side (axial, coronal, sagittal) cut through the
tumour (:func:`tumour_centre`), each with a caption, and a legend below them.

Colours (:data:`LABEL_COLOURS`) follow ITK-SNAP's usual BraTS label scheme:
NCR/NET red (255, 0, 0), edema green (0, 255, 0), enhancing tumour yellow
(255, 255, 0).

Display conventions. Both arrays are first reoriented to the closest canonical RAS
grid (``nibabel.orientations.io_orientation``), so a volume stored in any axis order
or direction looks the same. Then, as in a radiology viewer and in ITK-SNAP:

* axial: seen from the feet, anterior at the top, the patient's left on the image's
  right (radiological convention);
* coronal: seen from the front, superior at the top, the patient's left on the
  image's right;
* sagittal: seen from the patient's left, superior at the top, anterior on the left.

Captions give the slice index in that RAS grid (``x`` runs to the patient's right,
``y`` to anterior, ``z`` to superior). For a file stored in RAS it is the file's own
index; along an axis the file stores reversed it counts from the other end.

Greyscale is the image windowed at the 0.5 and 99.5 percentiles of its nonzero voxels
(the whole volume, not per slice). Each panel is scaled to ``size`` pixels high and to
the width that keeps its physical aspect ratio, with voxel sizes taken from the affine;
grey values are resampled bilinearly and labels by nearest neighbour, then blended, so
label edges stay sharp and label colours exact.
"""

from __future__ import annotations

import io
import logging
import math
import os
from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation
from PIL import Image, ImageDraw, ImageFont

from model.atomic import atomic_write
from model.labels import BACKGROUND, EDEMA, ENHANCING, NCR_NET

logger = logging.getLogger(__name__)

#: RGB colour of each BraTS 2018 label (ITK-SNAP's BraTS scheme).
LABEL_COLOURS: dict[int, tuple[int, int, int]] = {
    NCR_NET: (255, 0, 0),
    EDEMA: (0, 255, 0),
    ENHANCING: (255, 255, 0),
}

#: Legend text of each label, in legend order.
LABEL_NAMES: dict[int, str] = {NCR_NET: "NCR/NET", EDEMA: "edema", ENHANCING: "enhancing"}

#: Height in pixels of the caption strip above the panels.
CAPTION_HEIGHT = 14
#: Height in pixels of the legend strip below the panels.
LEGEND_HEIGHT = 18
#: Black gap in pixels between neighbouring panels.
PANEL_GAP = 4

#: Percentiles of the nonzero voxels mapped to black and white.
WINDOW_PERCENTILES = (0.5, 99.5)

_BACKGROUND_RGB = (0, 0, 0)
_TEXT_RGB = (255, 255, 255)
_SWATCH_PX = 10


def tumour_centre(labels: np.ndarray) -> tuple[int, int, int]:
    """Returns the slice indices that cut through the most tumour.

    Args:
        labels: 3D label map; every nonzero voxel counts as tumour.

    Returns:
        For each axis, the index of the slice holding the most tumour voxels (the
        lowest such index on a tie); the volume centre (``shape // 2``) when there is
        no tumour.

    Raises:
        ValueError: ``labels`` is not 3D.
    """
    arr = np.asarray(labels)
    if arr.ndim != 3:
        raise ValueError(f"labels must be a 3D array, got shape {arr.shape}")
    tumour = arr != BACKGROUND
    if not tumour.any():
        n0, n1, n2 = arr.shape
        return n0 // 2, n1 // 2, n2 // 2
    centre = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        centre.append(int(np.argmax(tumour.sum(axis=others))))
    return centre[0], centre[1], centre[2]


def render_preview(
    image: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    alpha: float = 0.45,
    size: int = 256,
) -> Image.Image:
    """Draws axial, coronal and sagittal slices of ``image`` with ``labels`` overlaid.

    See the module docstring for the orientation, windowing and scaling conventions.

    Args:
        image: one 3D modality ``(X, Y, Z)``, e.g. FLAIR; any real dtype. Non-finite
            values are shown as 0.
        labels: label map on the same grid in the BraTS 2018 convention (0, 1, 2, 4);
            any numeric dtype holding only those values.
        affine: the 4x4 voxel-to-world matrix shared by both arrays.
        alpha: opacity of the label colours, from 0 (invisible) to 1 (opaque).
        size: height in pixels of each panel.

    Returns:
        An RGB image: a caption strip, the three panels side by side separated by
        :data:`PANEL_GAP` black pixels, and a legend strip.

    Raises:
        ValueError: an argument has the wrong shape or value (the message names it);
            labels outside the BraTS 2018 convention raise too (convert a 2023 map
            with :func:`model.labels.to_brats2018` first).
    """
    img, lab, aff = _validate(image, labels, affine, alpha, size)

    ornt = io_orientation(aff)
    img = apply_orientation(img, ornt)  # (X, Y, Z) in RAS order
    lab = apply_orientation(lab, ornt)
    ras_affine = aff @ inv_ornt_aff(ornt, img.shape)
    zooms = np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0))  # mm along x, y, z

    grey = _window(img)
    cx, cy, cz = tumour_centre(lab)
    # Each view: (caption, grey slice, label slice, (row mm, column mm)). Transposing
    # puts the later RAS axis on the rows; flipping both axes puts superior/anterior at
    # the top and the patient's right (or anterior, in the sagittal view) on the left.
    views = [
        (f"axial z={cz}", grey[:, :, cz], lab[:, :, cz], (zooms[1], zooms[0])),
        (f"coronal y={cy}", grey[:, cy, :], lab[:, cy, :], (zooms[2], zooms[0])),
        (f"sagittal x={cx}", grey[cx, :, :], lab[cx, :, :], (zooms[2], zooms[1])),
    ]
    panels = [
        _render_panel(g.T[::-1, ::-1], lb.T[::-1, ::-1], voxel_mm, alpha, size)
        for _, g, lb, voxel_mm in views
    ]
    return _compose(panels, [caption for caption, *_ in views], size)


def preview_png_bytes(
    image: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    *,
    alpha: float = 0.45,
    size: int = 256,
) -> bytes:
    """Returns the PNG encoding of :func:`render_preview` (same arguments)."""
    buffer = io.BytesIO()
    render_preview(image, labels, affine, alpha=alpha, size=size).save(buffer, format="PNG")
    return buffer.getvalue()


def save_preview(
    image: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike[str],
    *,
    alpha: float = 0.45,
    size: int = 256,
) -> Path:
    """Writes the preview of :func:`render_preview` to ``path`` as a PNG.

    The PNG is written to a temporary file in the same folder and moved into place,
    so ``path`` never holds a partial image.

    Args:
        image: see :func:`render_preview`.
        labels: see :func:`render_preview`.
        affine: see :func:`render_preview`.
        path: file to write (written atomically; missing folders are created).
        alpha: see :func:`render_preview`.
        size: see :func:`render_preview`.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    data = preview_png_bytes(image, labels, affine, alpha=alpha, size=size)
    target = atomic_write(path, lambda tmp: tmp.write_bytes(data))
    logger.debug("wrote preview %s (%d bytes)", target, len(data))
    return target


def _validate(
    image: np.ndarray, labels: np.ndarray, affine: np.ndarray, alpha: float, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checks the arguments of :func:`render_preview`; returns image, labels, affine."""
    img = np.asarray(image)
    lab = np.asarray(labels)
    aff = np.asarray(affine, dtype=np.float64)
    if img.ndim != 3:
        raise ValueError(f"image must be a 3D array (X, Y, Z), got shape {img.shape}")
    if img.dtype.kind not in "biuf":
        raise ValueError(f"image must hold real numbers, got dtype {img.dtype}")
    if lab.shape != img.shape:
        raise ValueError(f"labels must have the image's shape {img.shape}, got {lab.shape}")
    if lab.dtype.kind not in "biuf":
        raise ValueError(f"labels must hold numbers, got dtype {lab.dtype}")
    allowed = [BACKGROUND, *LABEL_COLOURS]
    if not np.isin(lab, allowed).all():
        bad = np.unique(lab[~np.isin(lab, allowed)])[:10].tolist()
        raise ValueError(
            f"labels holds values {bad} outside the BraTS 2018 labels {allowed}; "
            "convert with model.labels.to_brats2018 first"
        )
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {aff.shape}")
    if abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise ValueError(f"affine must be invertible, got linear part {aff[:3, :3].tolist()}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number from 0 to 1, got {alpha!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return img, lab.astype(np.uint8), aff


def _window(image: np.ndarray) -> np.ndarray:
    """Maps ``image`` to [0, 1] at its nonzero voxels' percentiles; returns float32."""
    img = np.nan_to_num(image.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    nonzero = img[img != 0]
    if nonzero.size == 0:
        return np.zeros(img.shape, dtype=np.float32)
    lo, hi = np.percentile(nonzero, WINDOW_PERCENTILES)
    if hi <= lo:  # constant intensity: show it white on black
        return (img >= hi).astype(np.float32)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _render_panel(
    grey: np.ndarray,
    labels: np.ndarray,
    voxel_mm: tuple[float, float],
    alpha: float,
    size: int,
) -> np.ndarray:
    """Scales one display-oriented slice to ``size`` rows and blends its labels.

    Args:
        grey: ``(rows, cols)`` float slice in [0, 1], top row first.
        labels: ``(rows, cols)`` uint8 labels of the same slice.
        voxel_mm: voxel edge lengths along the rows and along the columns.
        alpha: label opacity.
        size: output height in pixels.

    Returns:
        ``(size, width)`` RGB uint8 array.
    """
    rows, cols = grey.shape
    height_mm, width_mm = rows * voxel_mm[0], cols * voxel_mm[1]
    width = max(1, round(size * width_mm / height_mm))
    grey_img = Image.fromarray(np.ascontiguousarray(grey * 255.0, dtype=np.float32))
    grey_px = np.asarray(grey_img.resize((width, size), Image.Resampling.BILINEAR))
    label_img = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))
    label_px = np.asarray(label_img.resize((width, size), Image.Resampling.NEAREST))

    rgb = np.repeat(np.clip(grey_px, 0.0, 255.0)[..., None], 3, axis=-1)  # (H, W, 3)
    for value, colour in LABEL_COLOURS.items():
        mask = label_px == value
        rgb[mask] = (1.0 - alpha) * rgb[mask] + alpha * np.asarray(colour, dtype=np.float32)
    return np.round(rgb).astype(np.uint8)


def _compose(panels: list[np.ndarray], captions: list[str], size: int) -> Image.Image:
    """Lays the panels out side by side with captions above and a legend below."""
    width = sum(p.shape[1] for p in panels) + PANEL_GAP * (len(panels) - 1)
    canvas = Image.new("RGB", (width, CAPTION_HEIGHT + size + LEGEND_HEIGHT), _BACKGROUND_RGB)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    x = 0
    for panel, caption in zip(panels, captions, strict=True):
        canvas.paste(Image.fromarray(panel), (x, CAPTION_HEIGHT))
        draw.text((x + 2, 1), caption, fill=_TEXT_RGB, font=font)
        x += panel.shape[1] + PANEL_GAP

    top = CAPTION_HEIGHT + size
    swatch_top = top + (LEGEND_HEIGHT - _SWATCH_PX) // 2
    x = 4
    for value, name in LABEL_NAMES.items():
        box = (x, swatch_top, x + _SWATCH_PX - 1, swatch_top + _SWATCH_PX - 1)
        draw.rectangle(box, fill=LABEL_COLOURS[value])
        x += _SWATCH_PX + 4
        draw.text((x, swatch_top - 1), name, fill=_TEXT_RGB, font=font)
        x += math.ceil(draw.textlength(name, font=font)) + 12
    return canvas
