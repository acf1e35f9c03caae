"""Tests for model/inference/pipeline.py: whole-case segmentation with a tiny random network.

The network (width 4, fixed seed) is untrained, so its labels are arbitrary; what is
tested is the plumbing around it: geometry, reorientation, options and file output.
"""

from __future__ import annotations

from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from model.defaults import DEFAULT_FUSION, DEFAULT_TTA
from model.inference.case import CaseOutputs, process_case
from model.inference.fusion import fuse, fused_probabilities
from model.inference.pipeline import (
    Segmentation,
    SegmentationOptions,
    canonical_spacing,
    load_predictor,
    segment_case,
    segment_images,
    to_canonical,
)
from model.inference.postprocess import postprocess
from model.inference.preprocess import paste, preprocess
from model.inference.tiling import FAST_TILING, WIDE_TILING, Predictor, TileLayout
from model.io.nifti.read import load_case
from model.io.nifti.write import save_labels
from model.io.phantom import make_phantom, write_phantom
from model.labels import EDEMA, ENHANCING, NCR_NET
from model.net.checkpoint import CheckpointError, save_checkpoint
from model.net.network import ArchConfig, TaskOutputs, build_model

SHAPE = (40, 36, 24)
LABELS = {0, NCR_NET, EDEMA, ENHANCING}
RAW = SegmentationOptions(remove_small=False, relabel_edema=False)
WITH_PROBS = SegmentationOptions(probabilities=True)
#: Fewer, larger kept blocks than the paper's, to stay fast: 2 x 2 x 3 tiles on the
#: phantom's crop (32 x 31 x 21), one of them without brain and skipped.
SMALL_TILING = TileLayout(patch=(32, 32, 16), kept=(20, 20, 10), offset=(6, 6, 3))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, two threads that spin-wait for
    each other run these tiny convolutions 10x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def config() -> ArchConfig:
    return ArchConfig(width=4)


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    return build_model(config)


@pytest.fixture(scope="module")
def predictor(model) -> Predictor:
    return Predictor([model], device="cpu", batch_size=8, layout=SMALL_TILING)


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return make_phantom(SHAPE, seed=0)


@pytest.fixture(scope="module")
def ras(phantom, predictor) -> tuple[Segmentation, list[tuple[int, int]]]:
    """The phantom (RAS) segmented with default options plus probabilities."""
    images, _, affine = phantom
    progress: list[tuple[int, int]] = []
    seg = segment_images(
        images, affine, predictor, WITH_PROBS, progress=lambda d, t: progress.append((d, t))
    )
    return seg, progress


@pytest.fixture(scope="module")
def task_probs(phantom, predictor):
    """The crop of the phantom and the predictor's task probabilities on it."""
    prep = preprocess(phantom[0])
    return prep, predictor.predict(prep.images, prep.mask)


def _check_label_map(labels: np.ndarray, images: np.ndarray) -> None:
    assert labels.dtype == np.uint8
    assert labels.shape == images.shape[1:]
    assert set(np.unique(labels).tolist()) <= LABELS
    assert not labels[~images.any(axis=0)].any()  # nothing outside the brain


# --------------------------------------------------------------------------------------
# segment_images on the phantom


def test_labels_on_the_input_grid(phantom, ras):
    images = phantom[0]
    seg, progress = ras
    assert isinstance(seg, Segmentation)
    _check_label_map(seg.labels, images)
    assert len(np.unique(seg.labels)) >= 3  # the random network does find "tumour"
    assert set(seg.timings) == {
        "preprocess",
        "inference",
        "fusion",
        "postprocess",
        "quality",
        "paste",
    }
    assert all(t >= 0 for t in seg.timings.values())
    mask = preprocess(images).mask
    n_tiles = len(SMALL_TILING.kept_origins(mask.shape, mask))
    assert n_tiles > 1
    assert [d for d, _ in progress] == [*range(8, n_tiles, 8), n_tiles]  # batches of 8
    assert all(t == n_tiles for _, t in progress)


def test_raw_labels_are_the_fused_task_outputs(phantom, predictor, task_probs):
    images, _, affine = phantom
    prep, probs = task_probs
    raw = segment_images(images, affine, predictor, RAW)
    assert RAW.fusion == DEFAULT_FUSION
    expected = fuse(probs, prep.mask, rule=DEFAULT_FUSION)
    np.testing.assert_array_equal(raw.labels, paste(expected, prep))
    assert raw.probabilities is None  # only computed on request
    paper = segment_images(images, affine, predictor, replace(RAW, fusion="argmax"))
    np.testing.assert_array_equal(paper.labels, paste(fuse(probs, prep.mask), prep))


class BrightFlairNet(nn.Module):
    """A fake network calling edema wherever the normalised FLAIR exceeds 1, nothing else.

    No ET at all, so post-processing step 2 relabels part of the edema; isolated bright
    voxels become tiny components for step 1 to remove.
    """

    def forward(self, x: torch.Tensor) -> TaskOutputs:
        flair = x[:, 3]  # (B, D, H, W)
        low = torch.full_like(flair, -20.0)
        five = torch.stack([low, torch.zeros_like(flair), low, 8.0 * (flair - 1.0), low], dim=1)
        return TaskOutputs(five, five, torch.stack([torch.zeros_like(flair), low], dim=1))


def test_postprocessing_options_change_only_their_step(phantom):
    images, _, affine = phantom
    images = images.copy()
    specks = [(8, 18, 12), (20, 6, 12), (20, 18, 4)]  # brain voxels far from the tumour
    for voxel in specks:
        images[(3, *voxel)] = 5000.0  # FLAIR
    predictor = Predictor([BrightFlairNet()], device="cpu", layout=SMALL_TILING)
    prep = preprocess(images)
    raw = segment_images(images, affine, predictor, replace(RAW, probabilities=True))
    assert all(raw.labels[v] == EDEMA for v in specks)
    raw_crop = raw.labels[prep.bbox]
    for remove_small, relabel_edema in [(True, True), (True, False), (False, True)]:
        options = SegmentationOptions(
            remove_small=remove_small,
            relabel_edema=relabel_edema,
            relabel_guard=False,
            probabilities=True,
        )
        seg = segment_images(images, affine, predictor, options)
        expected = postprocess(
            raw_crop, prep.images, remove_small=remove_small, relabel_edema=relabel_edema
        )
        np.testing.assert_array_equal(seg.labels, paste(expected, prep))
        np.testing.assert_array_equal(seg.probabilities, raw.probabilities)  # untouched
        changed = seg.labels != raw.labels
        assert changed.any()  # every step does something on this case
        if not relabel_edema:  # step 1 only deletes tumour: the specks
            assert not seg.labels[changed].any()
            assert {tuple(v) for v in np.argwhere(changed)} == set(specks)
        if not remove_small:  # step 2 only turns edema into NCR/NET
            assert set(np.unique(raw.labels[changed]).tolist()) == {EDEMA}
            assert set(np.unique(seg.labels[changed]).tolist()) == {NCR_NET}


def test_probabilities_option(phantom, ras, task_probs):
    images = phantom[0]
    probs = ras[0].probabilities
    assert probs is not None
    assert probs.shape == (4, *SHAPE) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert probs.min() >= 0.0
    outside = ~images.any(axis=0)
    np.testing.assert_array_equal(probs[0][outside], 1.0)
    np.testing.assert_array_equal(probs[1:][:, outside], 0.0)
    prep, task = task_probs
    expected = fused_probabilities(task, prep.mask, rule=DEFAULT_FUSION)
    np.testing.assert_array_equal(probs[(slice(None), *prep.bbox)], expected)
    assert (probs[0] < 0.5).any()  # some tumour probability, not background everywhere


# --------------------------------------------------------------------------------------
# Orientation: the same world image stored in another voxel order


def _reorient(images: np.ndarray, affine: np.ndarray, ornt: np.ndarray):
    """The same world image with its array axes permuted/flipped by ``ornt``."""
    moved = nib.orientations.apply_orientation(np.moveaxis(images, 0, -1), ornt)
    new_images = np.ascontiguousarray(np.moveaxis(moved, -1, 0))
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, images.shape[1:])
    return new_images, new_affine


def _matching_voxels(shape, affine, ref_affine):
    """For every voxel of a grid (shape, affine), its index on the grid of ``ref_affine``."""
    index = np.indices(shape).reshape(3, -1)
    world = affine @ np.vstack([index, np.ones(index.shape[1])])
    ref = np.linalg.solve(ref_affine, world)[:3]
    rounded = np.rint(ref).astype(int)
    np.testing.assert_allclose(ref, rounded, atol=1e-6)  # same grid, voxel for voxel
    return tuple(index), tuple(rounded)


@pytest.mark.parametrize(
    "ornt",
    [
        [[1, -1], [2, 1], [0, -1]],  # slices along the first axis, two axes flipped
        [[0, -1], [1, -1], [2, 1]],  # LPS, as from DICOM
    ],
    ids=["permuted-flipped", "LPS"],
)
def test_non_ras_orientation_gives_the_same_world_labels(phantom, predictor, ras, ornt):
    images, _, affine = phantom
    ornt = np.asarray(ornt, dtype=float)
    other, other_affine = _reorient(images, affine, ornt)
    assert nib.aff2axcodes(other_affine) != ("R", "A", "S")
    here, there = _matching_voxels(other.shape[1:], other_affine, affine)
    np.testing.assert_array_equal(other[(slice(None), *here)], images[(slice(None), *there)])

    reference = ras[0]
    seg = segment_images(other, other_affine, predictor, WITH_PROBS)
    _check_label_map(seg.labels, other)
    np.testing.assert_array_equal(seg.labels[here], reference.labels[there])
    np.testing.assert_allclose(
        seg.probabilities[(slice(None), *here)], reference.probabilities[(slice(None), *there)]
    )

    # The network is not invariant to flips and axis swaps: ignoring the affine's
    # orientation would give other labels, so the comparison above can fail.
    wrong = segment_images(other, affine, predictor, WITH_PROBS)
    assert not np.allclose(
        wrong.probabilities[(slice(None), *here)], reference.probabilities[(slice(None), *there)]
    )


# --------------------------------------------------------------------------------------
# Files: segment_case and load_predictor


def test_segment_case_round_trip_through_files(tmp_path, predictor):
    paths = write_phantom(tmp_path / "in", name="case", shape=SHAPE, seed=1)
    case = load_case(paths["t1"].parent)
    seg = segment_case(case, predictor)
    np.testing.assert_array_equal(
        seg.labels, segment_images(case.images, case.affine, predictor).labels
    )
    _check_label_map(seg.labels, case.images)
    out = save_labels(seg.labels, case, tmp_path / "out" / "case_pred.nii.gz")
    img = nib.load(out)
    assert img.shape == case.shape == SHAPE
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, case.affine)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), seg.labels)


def test_load_predictor_from_checkpoint(tmp_path, model, config):
    path = save_checkpoint(tmp_path / "tiny.pt", model, config)
    loaded_predictor, loaded = load_predictor(
        [path], device="cpu", batch_size=3, layout=FAST_TILING, precision="float32"
    )
    assert [c.config for c in loaded] == [config]
    assert loaded_predictor.layout == FAST_TILING and loaded_predictor.batch_size == 3
    assert loaded_predictor.tta == DEFAULT_TTA  # the product default
    images = np.random.default_rng(0).standard_normal((4, 20, 18, 9)).astype(np.float32)
    got = loaded_predictor.predict(images)
    want = Predictor([model], device="cpu", layout=FAST_TILING, tta=DEFAULT_TTA).predict(images)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)

    ensemble, members = load_predictor([path, path], device="cpu", tta="off")
    assert len(ensemble.models) == 2 and len(members) == 2
    assert ensemble.layout == WIDE_TILING  # the product default
    assert ensemble.tta == "off"


def test_load_predictor_rejects_single_task_checkpoint(tmp_path):
    mc = ArchConfig(variant="mc", width=4)
    path = save_checkpoint(tmp_path / "mc.pt", build_model(mc), mc)
    with pytest.raises(ValueError, match="single-task 'mc'") as info:
        load_predictor([path], device="cpu")
    assert not isinstance(info.value, CheckpointError)
    with pytest.raises(CheckpointError):
        load_predictor([tmp_path / "missing.pt"], device="cpu")


# --------------------------------------------------------------------------------------
# A real BraTS case


@pytest.mark.data
def test_real_case_end_to_end(brats_case_dir, tmp_path, model):
    case = load_case(brats_case_dir)
    predictor = Predictor([model], device="cpu", batch_size=16, layout=FAST_TILING)
    seg = segment_case(case, predictor)
    out = save_labels(seg.labels, case, tmp_path / f"{case.name}_pred.nii.gz")
    img = nib.load(out)
    assert img.shape == case.shape == (240, 240, 155)
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, case.affine)
    data = np.asanyarray(img.dataobj)
    np.testing.assert_array_equal(data, seg.labels)
    _check_label_map(data, case.images)


def test_postprocess_modes_map_to_options():
    from model.inference.pipeline import POSTPROCESS_MODES, SegmentationOptions

    expected = {
        "main-lesion-relabel": (True, True, True),
        "main-lesion": (True, False, False),
        "paper": (True, True, False),
        "guarded": (True, True, True),
        "components": (True, False, False),
        "none": (False, False, False),
    }
    assert set(expected) == set(POSTPROCESS_MODES)
    for mode, (small, relabel, guard) in expected.items():
        options = SegmentationOptions.for_postprocess(mode, probabilities=True)
        assert (options.remove_small, options.relabel_edema, options.relabel_guard) == (
            small,
            relabel,
            guard,
        ), mode
        assert options.probabilities
        main_lesion = mode in ("main-lesion", "main-lesion-relabel")
        assert (options.main_lesion_gap_mm is not None) == main_lesion
    with pytest.raises(ValueError, match="postprocess"):
        SegmentationOptions.for_postprocess("kmeans")


def _two_bright_lesions(spacing: tuple[float, float, float]):
    """A plain brain with a bright-FLAIR main lesion and a smaller one 14 voxel steps
    away along the first axis (both far above the small-component threshold)."""
    images = np.full((4, *SHAPE), 100.0, np.float32)
    images += np.random.default_rng(0).normal(0, 1, images.shape).astype(np.float32)
    main = (slice(6, 14), slice(10, 18), slice(8, 14))
    far = (slice(28, 32), slice(12, 16), slice(9, 13))
    for box in (main, far):
        images[(3, *box)] = 5000.0
    affine = np.diag([*spacing, 1.0])
    return images, affine, main, far


def _removals(warnings: list[str]) -> list[str]:
    """The warnings other than the quality review (a phantom is no real brain)."""
    return [w for w in warnings if not w.startswith("review recommended")]


def test_main_lesion_mode_removes_a_far_lesion_and_says_so(tmp_path):
    predictor = Predictor([BrightFlairNet()], device="cpu", layout=SMALL_TILING)
    images, affine, main, far = _two_bright_lesions((1.0, 1.0, 1.0))
    kept = segment_images(
        images, affine, predictor, SegmentationOptions.for_postprocess("components")
    )
    assert kept.labels[far].all() and kept.labels[main].all()
    assert _removals(kept.warnings) == []
    seg = segment_images(
        images, affine, predictor, SegmentationOptions.for_postprocess("main-lesion")
    )
    assert seg.labels[main].all() and not seg.labels[far].any()
    np.testing.assert_array_equal(seg.labels[seg.labels != kept.labels], 0)
    (warning,) = _removals(seg.warnings)
    assert "1 predicted tumour part (0.1 mL)" in warning and "10 mm" in warning
    assert "components" in warning  # what to do about it

    # the same lesions 14 voxels apart at 0.5 mm are 7 mm apart: one lesion
    images, affine, main, far = _two_bright_lesions((0.5, 1.0, 1.0))
    close = segment_images(
        images, affine, predictor, SegmentationOptions.for_postprocess("main-lesion")
    )
    assert close.labels[far].all() and _removals(close.warnings) == []

    # the warning reaches the case report that the CLI and the workers write
    images, affine, _, _ = _two_bright_lesions((1.0, 1.0, 1.0))
    folder = tmp_path / "two"
    folder.mkdir()
    for channel, modality in enumerate(("t1", "t1ce", "t2", "flair")):
        nib.save(nib.Nifti1Image(images[channel], affine), folder / f"two_{modality}.nii.gz")
    report = process_case(
        folder,
        predictor,
        CaseOutputs(tmp_path / "out" / "two_seg.nii.gz"),
        SegmentationOptions.for_postprocess("main-lesion"),
    )
    assert report.warnings == seg.warnings
    assert report.to_dict()["warnings"] == seg.warnings


def test_canonical_spacing_follows_the_reorientation():
    # file axes (x, y, z) hold (S, R, A) at 3, 1 and 2 mm
    affine = np.array(
        [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0, 0, 0, 1]]
    )
    assert canonical_spacing(affine) == (1.0, 2.0, 3.0)
    volume = np.zeros((4, 5, 6))
    assert to_canonical(volume, affine).shape == (5, 6, 4)


def test_the_options_defaults_are_the_products_post_processing():
    from model.defaults import DEFAULT_POSTPROCESS
    from model.inference.pipeline import SegmentationOptions

    assert SegmentationOptions() == SegmentationOptions.for_postprocess(DEFAULT_POSTPROCESS)
