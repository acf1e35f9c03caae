"""Tests for model/io/preview.py on small synthetic volumes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from model.io.preview import (
    CAPTION_HEIGHT,
    LABEL_COLOURS,
    PANEL_GAP,
    preview_png_bytes,
    render_preview,
    save_preview,
    tumour_centre,
)
from model.labels import EDEMA, ENHANCING, NCR_NET

SHAPE = (40, 48, 30)  # x (to the right), y (to anterior), z (to superior)
SIZE = 96
ALPHA = 0.45

# One 6-voxel cube per label in the right-anterior-superior part of the volume, all on
# the same y and z slices so that the axial and coronal panels show all three.
Y_BOX, Z_BOX = (30, 36), (18, 24)
X_BOXES = {NCR_NET: (4, 10), EDEMA: (14, 20), ENHANCING: (24, 30)}


def _case(tumour: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A noisy ellipsoidal 'brain' with a cube of each label; RAS affine, 1 mm voxels."""
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    brain = x**2 + y**2 + z**2 < 0.9
    image = np.where(brain, 100.0 + 50.0 * x + rng.normal(0, 5, SHAPE), 0.0).astype(np.float32)
    labels = np.zeros(SHAPE, dtype=np.uint8)
    if tumour:
        for value, (x0, x1) in X_BOXES.items():
            labels[x0:x1, slice(*Y_BOX), slice(*Z_BOX)] = value
    return image, labels, np.eye(4)


def _pixels(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape[2] == 3
    return arr.astype(int)


def _axial_width(size: int = SIZE) -> int:
    # Axial panel: rows run along y (48 mm), columns along x (40 mm).
    return round(size * SHAPE[0] / SHAPE[1])


def _axial_pixel(x_box: tuple[int, int], y_box: tuple[int, int]) -> tuple[int, int]:
    """(row, col) in the preview of the centre of a voxel box in the axial panel.

    The axial panel puts anterior (high y) at the top and the patient's right (high x)
    on the left, so a box [lo, hi) lies at display positions [n - hi, n - lo).
    """
    row = (SHAPE[1] - sum(y_box) / 2) * SIZE / SHAPE[1]
    col = (SHAPE[0] - sum(x_box) / 2) * _axial_width() / SHAPE[0]
    return CAPTION_HEIGHT + int(row), int(col)


def _flip(arr: np.ndarray, affine: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Reverses ``axis`` of ``arr``; returns it with the affine that keeps world positions."""
    out = affine.copy()
    out[:3, 3] += affine[:3, axis] * (arr.shape[axis] - 1)
    out[:3, axis] *= -1
    return np.flip(arr, axis), out


def test_tumour_centre_picks_the_fullest_slice_per_axis():
    labels = np.zeros((6, 7, 8), dtype=np.uint8)
    labels[2, 1, 3:6] = EDEMA  # three voxels in slice x=2, y=1, z=3..5
    labels[4, 5, 5] = NCR_NET  # one voxel; makes z=5 the fullest z slice
    assert tumour_centre(labels) == (2, 1, 5)


def test_tumour_centre_without_tumour_is_the_volume_centre():
    assert tumour_centre(np.zeros((6, 7, 9), dtype=np.uint8)) == (3, 3, 4)


def test_tumour_centre_rejects_non_3d():
    with pytest.raises(ValueError, match="labels"):
        tumour_centre(np.zeros((4, 4), dtype=np.uint8))


def test_preview_is_rgb_with_three_panels_side_by_side():
    image, labels, affine = _case()
    img = render_preview(image, labels, affine, size=SIZE)
    assert img.mode == "RGB"
    # Coronal and sagittal panels: rows along z (30 mm), columns along x / y.
    coronal, sagittal = round(SIZE * 40 / 30), round(SIZE * 48 / 30)
    assert img.width == _axial_width() + coronal + sagittal + 2 * PANEL_GAP
    assert img.width > img.height > SIZE


def test_axial_panel_shows_each_label_in_its_colour_where_the_cube_is():
    image, labels, affine = _case()
    px = _pixels(render_preview(image, labels, affine, alpha=ALPHA, size=SIZE))
    lift = ALPHA * 255  # a colour channel at 255 rises this much above the grey ones
    for value, x_box in X_BOXES.items():
        r, g, b = px[_axial_pixel(x_box, Y_BOX)]
        expected = np.array(LABEL_COLOURS[value]) / 255 * lift
        assert np.allclose([r - b, g - b], expected[[0, 1]], atol=1.5), (value, r, g, b)


def test_axial_panel_puts_anterior_at_top_and_patient_right_on_the_left():
    image, labels, affine = _case()
    px = _pixels(render_preview(image, labels, affine, size=SIZE))
    red = (px[..., 0] - px[..., 1]) > 50
    axial = red[CAPTION_HEIGHT : CAPTION_HEIGHT + SIZE, : _axial_width()]
    rows, cols = np.nonzero(axial)
    # NCR sits at y 30..35 of 48 (anterior) and x 4..9 of 40 (patient's left side).
    assert rows.max() < SIZE / 2
    assert cols.min() > _axial_width() / 2


def test_no_tumour_gives_pure_greyscale_panels():
    image, labels, affine = _case(tumour=False)
    px = _pixels(render_preview(image, labels, affine, size=SIZE))
    panels = px[: CAPTION_HEIGHT + SIZE]
    assert np.array_equal(panels[..., 0], panels[..., 1])
    assert np.array_equal(panels[..., 1], panels[..., 2])
    assert panels.max() > 200  # the brain is drawn, not a black image


def test_flipped_storage_gives_the_identical_png():
    image, labels, affine = _case()
    expected = preview_png_bytes(image, labels, affine, size=SIZE)
    flipped_image, flipped_affine = _flip(*_flip(image, affine, 0), 1)
    flipped_labels, _ = _flip(*_flip(labels, affine, 0), 1)
    assert np.allclose(flipped_affine[:3, :3], np.diag([-1, -1, 1]))
    assert preview_png_bytes(flipped_image, flipped_labels, flipped_affine, size=SIZE) == expected


def test_permuted_anisotropic_storage_gives_the_identical_png():
    image, labels, _ = _case()
    affine = np.diag([1.0, 1.2, 2.0, 1.0])
    expected = preview_png_bytes(image, labels, affine, size=SIZE)
    # Store as (z, x, y) with z reversed: array axis 0 is -z, 1 is x, 2 is y.
    perm_affine = affine[:, [2, 0, 1, 3]]
    perm_image, perm_affine2 = _flip(np.transpose(image, (2, 0, 1)), perm_affine, 0)
    perm_labels, _ = _flip(np.transpose(labels, (2, 0, 1)), perm_affine, 0)
    assert preview_png_bytes(perm_image, perm_labels, perm_affine2, size=SIZE) == expected


def test_voxel_sizes_set_the_panel_aspect():
    image, labels, _ = _case()
    img = render_preview(image, labels, np.diag([1.5, 1.0, 2.0, 1.0]), size=SIZE)
    # The volume spans 60 mm in x, 48 mm in y and 60 mm in z. Axial: 60 wide by 48
    # high; coronal: 60 by 60; sagittal: 48 by 60.
    axial, coronal, sagittal = round(SIZE * 60 / 48), SIZE, round(SIZE * 48 / 60)
    assert img.width == axial + coronal + sagittal + 2 * PANEL_GAP


def test_inputs_are_not_modified():
    image, labels, affine = _case()
    copies = image.copy(), labels.copy(), affine.copy()
    render_preview(image, labels, affine, size=SIZE)
    for before, after in zip(copies, (image, labels, affine), strict=True):
        assert np.array_equal(before, after)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"image": np.zeros((4, 4))}, "image"),
        ({"labels": np.zeros((4, 4, 5), dtype=np.uint8)}, "labels"),
        ({"labels": np.full((4, 4, 4), 3, dtype=np.uint8)}, "labels"),
        ({"affine": np.eye(3)}, "affine"),
        ({"affine": np.zeros((4, 4))}, "affine"),
        ({"alpha": 1.5}, "alpha"),
        ({"size": 0}, "size"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    args = {
        "image": np.ones((4, 4, 4), dtype=np.float32),
        "labels": np.zeros((4, 4, 4), dtype=np.uint8),
        "affine": np.eye(4),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        render_preview(**args)


def test_save_preview_writes_a_png(tmp_path):
    image, labels, affine = _case()
    path = save_preview(image, labels, affine, tmp_path / "case.png", size=SIZE)
    assert path == tmp_path / "case.png"
    assert [p.name for p in tmp_path.iterdir()] == ["case.png"]  # no temp file left
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.mode == "RGB"
        reread = np.asarray(img)
    expected = Image.open(io.BytesIO(preview_png_bytes(image, labels, affine, size=SIZE)))
    assert np.array_equal(reread, np.asarray(expected))
