"""Tests of model/training/data.py: the training cache and the paper's patch sampler.

Cache tests run on small phantom case folders; sampler tests use cases built by hand
(CachedCase from numpy arrays) whose image channels encode each voxel's coordinates,
so a drawn patch tells where its centre was.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from model.inference.pipeline import to_canonical
from model.inference.preprocess import preprocess
from model.io.nifti.files import find_label_file
from model.io.nifti.read import load_case, load_labels
from model.io.phantom import make_phantom, write_phantom
from model.io.volumes import InputError
from model.labels import CORE_CLASSES, TUMOUR_CLASSES, TaskClass, labels_to_task_target
from model.training import data as data_module
from model.training.data import (
    HALF,
    PATCH,
    TUMOUR_DILATION,
    CachedCase,
    PatchSampler,
    build_cache,
    cache_case,
    enhancing_target,
    read_split,
    transfer_targets,
)

SHAPE = (40, 40, 24)
NAME = "Brats18_TEST_1_1"
PATCH_VOXELS = int(np.prod(PATCH))  # 16384


# --------------------------------------------------------------------------- cache
@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cases")
    write_phantom(root, name=NAME, shape=SHAPE, seed=1)
    return root / NAME


@pytest.fixture(scope="module")
def cached(phantom_dir, tmp_path_factory) -> Path:
    return cache_case(phantom_dir, tmp_path_factory.mktemp("cache"))


def _arrays(folder: Path) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    images = np.load(folder / "images.npy")
    target = np.load(folder / "target.npy")
    centres = [np.load(folder / f"centres_{k}.npy") for k in (1, 2, 3)]
    return images, target, centres


def _unpad(volume: np.ndarray) -> np.ndarray:
    return volume[(..., *(slice(h, -h) for h in HALF))]


def test_cache_case_writes_every_file(cached):
    assert cached.name == NAME
    names = {p.name for p in cached.iterdir()}
    assert {"images.npy", "target.npy", "meta.json"} <= names
    assert {f"centres_{k}.npy" for k in (1, 2, 3)} <= names
    meta = json.loads((cached / "meta.json").read_text())
    assert meta["version"] == data_module.CACHE_VERSION and meta["name"] == NAME


def test_images_are_float16_normalised_and_padded_by_half(cached):
    images, target, _ = _arrays(cached)
    assert images.dtype == np.float16 and target.dtype == np.uint8
    brain = make_phantom(shape=SHAPE, seed=1)[0].any(axis=0)
    idx = np.argwhere(brain)
    crop = tuple(int(n) for n in idx.max(axis=0) - idx.min(axis=0) + 1)
    assert images.shape == (4, *(c + 2 * h for c, h in zip(crop, HALF, strict=True)))
    assert target.shape == images.shape[1:]
    inner = np.zeros(target.shape, dtype=bool)
    inner[tuple(slice(h, -h) for h in HALF)] = True
    assert not images[:, ~inner].any() and not target[~inner].any()  # zero padding
    inside = _unpad(target) != TaskClass.BACKGROUND
    values = _unpad(images)[:, inside].astype(np.float64)  # (4, N)
    np.testing.assert_allclose(values.mean(axis=1), 0.0, atol=1e-2)
    np.testing.assert_allclose(values.std(axis=1), 1.0, atol=1e-2)


def test_target_is_the_five_class_target_on_the_canonical_crop(cached, phantom_dir):
    _, target, _ = _arrays(cached)
    # The same crop recomputed from the files ...
    case = load_case(phantom_dir)
    labels = to_canonical(load_labels(find_label_file(phantom_dir), like=case), case.affine)
    prep = preprocess(to_canonical(case.images, case.affine))
    expected = labels_to_task_target(labels[prep.bbox], prep.mask)
    np.testing.assert_array_equal(_unpad(target), expected)
    # ... and by hand from the phantom (RAS already): 0 outside, 1 normal, NCR 2, ED 3, ET 4.
    images, raw, _ = make_phantom(shape=SHAPE, seed=1)
    brain = images.any(axis=0)
    lo, hi = np.argwhere(brain).min(axis=0), np.argwhere(brain).max(axis=0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    lut = np.array([1, 2, 3, 0, 4])  # brain voxels: label 0 -> 1, 1 -> 2, 2 -> 3, 4 -> 4
    by_hand = np.where(brain[box], lut[raw[box]], 0)
    np.testing.assert_array_equal(_unpad(target), by_hand)
    assert set(np.unique(target)) == {0, 1, 2, 3, 4}


def test_task_centres_follow_the_regions(cached):
    _, target, (c1, c2, c3) = _arrays(cached)
    assert all(c.dtype == np.int16 and c.ndim == 2 and c.shape[1] == 3 for c in (c1, c2, c3))
    brain = target != TaskClass.BACKGROUND
    tumour = np.isin(target, TUMOUR_CLASSES)
    core = np.isin(target, [TaskClass.NCR_NET, TaskClass.ENHANCING])
    distance = ndimage.distance_transform_edt(~tumour)  # to the nearest tumour voxel

    def as_set(centres):
        return {tuple(int(v) for v in c) for c in centres}

    assert as_set(c1) == as_set(np.argwhere(brain))
    assert all(brain[tuple(c)] for c in c2)
    assert max(distance[tuple(c)] for c in c2) <= TUMOUR_DILATION
    assert as_set(c2) == as_set(np.argwhere(brain & (distance <= TUMOUR_DILATION)))
    assert len(c2) > tumour.sum()  # really dilated, not the tumour alone
    assert as_set(c3) == as_set(np.argwhere(core))
    assert all(target[tuple(c)] in (TaskClass.NCR_NET, TaskClass.ENHANCING) for c in c3)
    # Every candidate's patch lies inside the padded volume.
    for centres in (c1, c2, c3):
        assert (centres.min(axis=0) >= HALF).all()
        assert (centres.max(axis=0) + HALF <= target.shape).all()


def _write_flipped(src: Path, dest: Path) -> None:
    """Rewrites a case folder with the X axis stored in reverse (an 'LAS' file)."""
    dest.mkdir(parents=True)
    for path in src.iterdir():
        img = nib.load(path)
        data = np.asarray(img.dataobj)
        flip = np.diag([-1.0, 1.0, 1.0, 1.0])
        flip[0, 3] = data.shape[0] - 1
        affine = img.affine @ flip
        out = nib.Nifti1Image(data[::-1].copy(), affine)
        out.header.set_qform(affine, code=1)
        out.header.set_sform(affine, code=1)
        nib.save(out, dest / path.name.replace(src.name, dest.name))


def test_cache_reorients_images_and_labels_together(cached, phantom_dir, tmp_path):
    _write_flipped(phantom_dir, tmp_path / "flipped")
    other = cache_case(tmp_path / "flipped", tmp_path / "cache")
    for a, b in zip(_arrays(cached), _arrays(other), strict=True):
        if isinstance(a, list):
            for x, y in zip(a, b, strict=True):
                np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_array_equal(a, b)


def test_cache_case_without_labels_raises(phantom_dir, tmp_path):
    folder = tmp_path / "nolabels"
    folder.mkdir()
    for path in phantom_dir.iterdir():
        if not path.name.endswith("_seg.nii.gz"):
            (folder / path.name.replace(NAME, "nolabels")).write_bytes(path.read_bytes())
    with pytest.raises(InputError, match="label") as missing:
        cache_case(folder, tmp_path / "cache")
    assert missing.value.code == "not_found"  # every modality is there; the label map is not


def test_build_cache_caches_once_and_reports_progress(tmp_path, monkeypatch):
    for seed, name in enumerate(("a", "b")):
        write_phantom(tmp_path / "data", name=name, shape=(24, 24, 16), seed=seed)
    dirs = sorted((tmp_path / "data").iterdir())
    seen = []
    cases = build_cache(dirs, tmp_path / "cache", progress=lambda *a: seen.append(a))
    assert seen == [(1, 2, "a"), (2, 2, "b")]
    assert [c.name for c in cases] == ["a", "b"]
    assert isinstance(cases[0].images, np.memmap) and cases[0].images.dtype == np.float16
    assert all(len(c.centres) == 3 for c in cases)

    def refuse(*_args):
        raise AssertionError("a cached case was cached again")

    monkeypatch.setattr(data_module, "cache_case", refuse)
    again = build_cache(dirs, tmp_path / "cache")
    np.testing.assert_array_equal(again[1].target, cases[1].target)
    # A stale cache version is rebuilt.
    meta = tmp_path / "cache" / "b" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": -1}))
    with pytest.raises(AssertionError, match="cached again"):
        build_cache(dirs, tmp_path / "cache")


def test_read_split_skips_comments_and_blanks(tmp_path):
    path = tmp_path / "split.txt"
    path.write_text("# header\ncase_a\n\n  case_b  # note\n")
    assert read_split(path) == ["case_a", "case_b"]


# --------------------------------------------------------------------------- hand-made cases
def _coordinate_images(shape: tuple[int, int, int]) -> np.ndarray:
    """float16 (4, X, Y, Z): channels 0-2 hold each voxel's x, y, z; channel 3 is 1."""
    grid = np.indices(shape).astype(np.float16)
    return np.concatenate([grid, np.ones((1, *shape), dtype=np.float16)])


def _case(target: np.ndarray, centres: list[list[tuple[int, int, int]]], name="hand") -> CachedCase:
    arrays = tuple(np.array(c, dtype=np.int16).reshape(-1, 3) for c in centres)
    return CachedCase(name, _coordinate_images(target.shape), target, arrays)  # type: ignore[arg-type]


def _centre_of(patch_images: np.ndarray) -> tuple[int, int, int]:
    x, y, z = (int(v) for v in patch_images[:3, HALF[0], HALF[1], HALF[2]])
    return x, y, z


@pytest.fixture
def hand_case() -> CachedCase:
    """A 40 x 40 x 24 target (already padded), one centre list per task."""
    target = np.zeros((40, 40, 24), dtype=np.uint8)
    target[8:32, 8:32, 4:20] = TaskClass.NORMAL
    target[17:23, 17:23, 10:14] = TaskClass.EDEMA
    target[19:21, 19:22, 11:13] = TaskClass.ENHANCING
    target[20, 20, 12] = TaskClass.NCR_NET
    centres = [
        [(16, 16, 8), (24, 24, 16), (18, 22, 9)],  # normal tissue
        [(17, 17, 10), (22, 22, 13), (24, 20, 12)],  # edema, edema, normal next to it
        [(20, 20, 12), (19, 19, 11), (20, 21, 12)],  # NCR, ET, ET
    ]
    return _case(target, centres)


def test_draw_centres_each_patch_on_a_candidate_of_its_task(hand_case):
    sampler = PatchSampler([hand_case], batch_per_task=2, seed=3)
    for task in range(3):
        candidates = {tuple(int(v) for v in c) for c in hand_case.centres[task]}
        drawn = set()
        for _ in range(30):
            images, target = sampler._draw(task)
            assert images.shape == (4, *PATCH) and images.dtype == np.float32
            assert target.shape == PATCH and target.dtype == np.int64
            centre = _centre_of(images)
            assert centre in candidates
            assert target[HALF] == hand_case.target[centre]
            box = tuple(
                slice(c - h, c - h + p) for c, h, p in zip(centre, HALF, PATCH, strict=True)
            )
            np.testing.assert_array_equal(target, hand_case.target[box])
            drawn.add(centre)
        assert drawn == candidates  # uniform over 3 candidates: all met in 30 draws
    # The class under each task's centre is what its region promises.
    for _ in range(10):
        assert sampler._draw(2)[1][HALF] in CORE_CLASSES
        assert sampler._draw(0)[1][HALF] != TaskClass.BACKGROUND


def test_draw_skips_cases_without_candidates_for_the_task(hand_case):
    no_core = _case(hand_case.target, [[(16, 16, 8)], [(17, 17, 10)], []], name="no_core")
    sampler = PatchSampler([no_core, hand_case], batch_per_task=2, seed=0)
    for _ in range(20):
        assert _centre_of(sampler._draw(2)[0]) in {(20, 20, 12), (19, 19, 11), (20, 21, 12)}
    only = PatchSampler([no_core], batch_per_task=2)
    with pytest.raises(ValueError, match="task 3"):
        only._draw(2)


def test_sampler_rejects_bad_arguments(hand_case):
    with pytest.raises(ValueError, match="cases"):
        PatchSampler([])
    with pytest.raises(ValueError, match="batch_per_task"):
        PatchSampler([hand_case], batch_per_task=0)


# --------------------------------------------------------------------------- transfer
def _block(n_tumour: int, n_core: int = 0, shape=PATCH) -> np.ndarray:
    """A target of ``shape``: the first n_core voxels NCR, the next up to n_tumour edema."""
    flat = np.full(int(np.prod(shape)), TaskClass.NORMAL, dtype=np.int64)
    flat[:n_tumour] = TaskClass.EDEMA
    flat[:n_core] = TaskClass.NCR_NET
    return flat.reshape(shape)


@pytest.mark.parametrize(
    ("n_tumour", "n_core", "from_task", "expected"),
    [
        (400, 0, 1, (True, False)),  # exactly 40 % tumour
        (399, 0, 1, (False, False)),
        (1000, 0, 1, (True, False)),
        (400, 0, 2, (False, False)),  # a task-2 patch never goes to task 2
        (500, 500, 1, (True, True)),  # exactly 50 % core
        (500, 499, 1, (True, False)),
        (500, 500, 2, (False, True)),
        (499, 499, 2, (False, False)),
        (1000, 1000, 3, (False, False)),  # task-3 patches go nowhere
    ],
)
def test_transfer_thresholds_on_1000_voxels(n_tumour, n_core, from_task, expected):
    target = _block(n_tumour, n_core, shape=(10, 10, 10))
    assert transfer_targets(target, from_task) == expected


def test_transfer_thresholds_on_full_patches():
    need_tumour = int(np.ceil(0.4 * PATCH_VOXELS))  # 6554 of 16384
    need_core = PATCH_VOXELS // 2
    assert transfer_targets(_block(need_tumour), 1) == (True, False)
    assert transfer_targets(_block(need_tumour - 1), 1) == (False, False)
    assert transfer_targets(_block(need_core, need_core), 1) == (True, True)
    assert transfer_targets(_block(need_core, need_core - 1), 1) == (True, False)
    # Enhancing tumour counts as core as well as NCR does.
    et = _block(0)
    et.reshape(-1)[:need_core] = TaskClass.ENHANCING
    assert transfer_targets(et, 2) == (False, True)


def test_enhancing_target_marks_only_et():
    target = np.array([[[0, 1, 2, 3, 4, 4]]])
    out = enhancing_target(target)
    np.testing.assert_array_equal(out, [[[0, 0, 0, 0, 1, 1]]])
    assert out.dtype == np.int64


def _single_patch_case(patch_target: np.ndarray, tasks=(0, 1, 2)) -> CachedCase:
    """A case that is exactly one patch: every task draws its whole volume."""
    centre = [HALF]
    centres = [centre if k in tasks else [] for k in range(3)]
    return _case(patch_target.astype(np.uint8), centres)


def test_sample_transfers_exactly_at_the_thresholds():
    need_tumour = int(np.ceil(0.4 * PATCH_VOXELS))
    at = PatchSampler([_single_patch_case(_block(need_tumour))], batch_per_task=2, seed=0)
    batch = at.sample((True, True, True))
    assert batch.transferred == (0, 2, 0)
    assert len(batch.images[1]) == 4 and len(batch.images[2]) == 2

    below = PatchSampler([_single_patch_case(_block(need_tumour - 1))], batch_per_task=2)
    assert below.sample((True, True, True)).transferred == (0, 0, 0)

    half = PATCH_VOXELS // 2
    core = PatchSampler([_single_patch_case(_block(half, half))], batch_per_task=2)
    batch = core.sample((True, True, True))
    # Task 1's two patches go to tasks 2 and 3; task 2's two own patches go to task 3.
    assert batch.transferred == (0, 2, 4)
    assert [len(b) for b in batch.images] == [2, 4, 6]

    below_core = PatchSampler([_single_patch_case(_block(half, half - 1))], batch_per_task=2)
    assert below_core.sample((True, True, True)).transferred == (0, 2, 0)


def test_sample_task2_patches_never_transfer_to_task2():
    full = _single_patch_case(_block(PATCH_VOXELS, PATCH_VOXELS))
    batch = PatchSampler([full], batch_per_task=2).sample((False, True, True))
    assert batch.images[0] is None and batch.targets[0] is None
    assert len(batch.images[1]) == 2
    assert batch.transferred == (0, 0, 2)


def test_sample_task3_target_is_enhancing_only():
    target = _block(3 * PATCH_VOXELS // 4, PATCH_VOXELS // 4)  # 75 % tumour, 25 % NCR
    target.reshape(-1)[PATCH_VOXELS // 4 : PATCH_VOXELS // 2] = TaskClass.ENHANCING
    sampler = PatchSampler([_single_patch_case(target)], batch_per_task=2, seed=1)
    batch = sampler.sample((True, True, True))
    assert batch.transferred == (0, 2, 4)  # 75 % tumour, 50 % core
    for k in (0, 1):
        for t in batch.targets[k]:
            np.testing.assert_array_equal(t, target)
    assert batch.targets[2].dtype == np.int64
    for t in batch.targets[2]:
        np.testing.assert_array_equal(t, target == TaskClass.ENHANCING)
    assert batch.targets[2].sum() > 0 and batch.images[2].shape == (6, 4, *PATCH)


def test_sample_only_active_tasks_and_no_transfer_into_inactive_ones():
    full = _single_patch_case(_block(PATCH_VOXELS, PATCH_VOXELS))
    sampler = PatchSampler([full], batch_per_task=3)
    batch = sampler.sample((True, False, False))
    assert batch.images[1] is None and batch.targets[1] is None
    assert batch.images[2] is None and batch.targets[2] is None
    assert batch.transferred == (0, 0, 0) and len(batch.images[0]) == 3
    batch = sampler.sample((True, True, False))
    assert batch.images[2] is None and batch.transferred == (0, 3, 0)
    batch = sampler.sample((True, False, True))
    assert batch.images[1] is None and batch.transferred == (0, 0, 3)


def test_transfer_off_never_transfers():
    full = _single_patch_case(_block(PATCH_VOXELS, PATCH_VOXELS))
    sampler = PatchSampler([full], batch_per_task=2, transfer=False)
    for _ in range(3):
        batch = sampler.sample((True, True, True))
        assert batch.transferred == (0, 0, 0)
        assert [len(b) for b in batch.images] == [2, 2, 2]


def test_state_dict_reproduces_the_next_batch(hand_case):
    other = _case(hand_case.target, [list(map(tuple, c)) for c in hand_case.centres], "other")
    sampler = PatchSampler([hand_case, other], batch_per_task=4, seed=7)
    sampler.sample((True, True, True))
    state = sampler.state_dict()
    first = sampler.sample((True, True, True))
    second = sampler.sample((True, True, True))
    restored = PatchSampler([hand_case, other], batch_per_task=4, seed=99)
    restored.load_state_dict(state)
    again = restored.sample((True, True, True))
    for a, b in zip(first.images + first.targets, again.images + again.targets, strict=True):
        np.testing.assert_array_equal(a, b)
    # The draws do move on: the following batch differs.
    assert any(not np.array_equal(a, b) for a, b in zip(first.images, second.images, strict=True))


def test_task1_tumour_fraction_moves_task1_centres_into_the_tumour_region():
    target = np.zeros((60, 60, 40), dtype=np.uint8)
    target[HALF[0] : 60 - HALF[0], HALF[1] : 60 - HALF[1], HALF[2] : 40 - HALF[2]] = 1
    target[28:32, 28:32, 18:22] = 3  # edema
    images = np.zeros((4, *target.shape), dtype=np.float16)
    tumour = np.argwhere(target == 3).astype(np.int16)
    case = CachedCase(
        "c", images, target, (np.argwhere(target > 0).astype(np.int16), tumour, tumour)
    )
    centre = tuple(HALF)

    def tumour_centred(fraction: float) -> float:
        sampler = PatchSampler(
            [case], batch_per_task=200, transfer=False, seed=1, task1_tumour_fraction=fraction
        )
        batch = sampler.sample((True, False, False))
        return float(np.mean([t[centre] == 3 for t in batch.targets[0]]))

    assert tumour_centred(1.0) == 1.0
    assert tumour_centred(0.0) < 0.05
    assert 0.35 < tumour_centred(0.5) < 0.65
    with pytest.raises(ValueError, match="task1_tumour_fraction"):
        PatchSampler([case], task1_tumour_fraction=1.5)
