"""Training data: a cache of normalised cases and the paper's patch sampler.

Cache. Each case is read once, reoriented to RAS (as at inference), normalised inside
its brain mask (the run's normalisation, the paper's z-score by default), cropped to
the brain and zero-padded by half a patch on every side, then stored as ``.npy`` files
that training memory-maps::

    <cache>/<case>/images.npy    float16 (4, X, Y, Z)   normalised modalities
    <cache>/<case>/target.npy    uint8   (X, Y, Z)      5-class target of tasks 1-2
    <cache>/<case>/centres_<k>.npy  int16 (N, 3)        candidate patch centres of task k
    <cache>/<case>/meta.json

A training step then reads only the patches it needs (a few MB), never whole volumes:
the page cache holds what is hot, and the process's own memory stays small. A BraTS
case takes about 55 MB in the cache.

Sampling (spec "Training"). Patches are 32 x 32 x 16 voxels; centres are drawn uniformly
(a case at random, then a candidate voxel of that case at random) from: task 1, the
brain; task 2, the ground-truth whole tumour dilated by :data:`TUMOUR_DILATION` voxels
(the paper leaves the amount open); task 3, the ground-truth tumour core.

Online training-data transfer (eq. 1 and 2): a task-1 patch also trains task 2 when at
least 40 % of its voxels are tumour; a task-1 or task-2 patch also trains task 3 when at
least 50 % of its voxels are tumour core. Task 3's target is ET vs everything else.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.defaults import DEFAULT_NORMALISATION
from model.inference.fusion import dilate
from model.inference.pipeline import to_canonical
from model.inference.preprocess import preprocess
from model.io.nifti.files import find_cases, find_label_file
from model.io.nifti.read import load_case, load_labels
from model.io.volumes import InputError
from model.labels import CORE_CLASSES, TUMOUR_CLASSES, TaskClass, labels_to_task_target
from model.training.augment import AugmentConfig, augment_patch

logger = logging.getLogger(__name__)

PATCH = (32, 32, 16)
HALF = tuple(p // 2 for p in PATCH)
TUMOUR_DILATION = 5
TRANSFER_TUMOUR = 0.40  # eq. 1
TRANSFER_CORE = 0.50  # eq. 2
CACHE_VERSION = 1
SPLITS_DIR = Path(__file__).resolve().parents[1] / "splits"
#: Environment variable naming the folder of real data sets (``<it>/brats2018/<case>/``).
#: Entry points (tests, benchmarks) read it and pass its value to :func:`resolve_data_dir`.
DATA_ENV = "OMNET_DATA_DIR"


def resolve_data_dir(value: str | None) -> Path:
    """The real-data folder: ``value`` when given (the caller's ``$OMNET_DATA_DIR``), else
    ``../shared/data`` beside the source checkout (where tests and benchmarks look for
    BraTS cases). An empty ``value`` counts as not given."""
    return Path(value) if value else Path(__file__).resolve().parents[3] / "shared" / "data"


# --------------------------------------------------------------------------- splits
def read_split(path: str | Path) -> list[str]:
    """Case names in a split file: one per line; blank lines and '#' comments ignored."""
    names = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


_BRATS_SITE = re.compile(r"brats\d\d_([a-z0-9]+)_", re.IGNORECASE)  # Brats18_TCIA01_378_1
_BRATS_YEAR = re.compile(r"brats(20\d\d)_", re.IGNORECASE)  # BraTS2021_00006


def institution_group(case_name: str) -> str:
    """The institution group a BraTS case name carries: ``Brats18_TCIA01_378_1`` ->
    ``TCIA01``, ``Brats18_2013_20_1`` -> ``2013``, ``Brats18_CBICA_AMH_1`` -> ``CBICA``;
    names of releases without a site field (``BraTS2021_00006``) give the release
    (``BraTS2021``), and any other name gives ``other``."""
    site = _BRATS_SITE.match(case_name)
    if site:
        return site.group(1)
    year = _BRATS_YEAR.match(case_name)
    return f"BraTS{year.group(1)}" if year else "other"


def find_cases_in(folders: Sequence[str | Path]) -> dict[str, Path]:
    """Case folders (every modality present) of several data folders, by case name.

    Raises:
        InputError: ``not_found`` when a folder does not exist.
        ValueError: one case name appears in two folders (or twice in the list).
    """
    cases: dict[str, Path] = {}
    for folder in folders:
        for case in find_cases(folder):
            if case.name in cases:
                raise ValueError(
                    f"case {case.name} is in both {cases[case.name].parent} and "
                    f"{case.parent}; a case name may appear only once across --data folders"
                )
            cases[case.name] = case
    return cases


# --------------------------------------------------------------------------- cache
@dataclass
class CachedCase:
    """One case of the cache, memory-mapped."""

    name: str
    images: np.ndarray  # float16 (4, X, Y, Z), padded
    target: np.ndarray  # uint8 (X, Y, Z), padded
    centres: tuple[np.ndarray, np.ndarray, np.ndarray]  # int16 (N_k, 3) per task

    @classmethod
    def open(cls, folder: Path) -> CachedCase:
        images = np.load(folder / "images.npy", mmap_mode="r")
        target = np.load(folder / "target.npy", mmap_mode="r")
        centres = tuple(np.load(folder / f"centres_{k}.npy") for k in (1, 2, 3))
        return cls(folder.name, images, target, centres)


def _task_centres(target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    brain = target != TaskClass.BACKGROUND
    tumour = np.isin(target, TUMOUR_CLASSES)
    core = np.isin(target, CORE_CLASSES)
    task2 = dilate(tumour, TUMOUR_DILATION) & brain
    return _voxel_list(brain), _voxel_list(task2), _voxel_list(core)


def _voxel_list(mask: np.ndarray) -> np.ndarray:
    """The ``(N, 3)`` int16 coordinates of the true voxels of ``mask``."""
    return np.argwhere(mask).astype(np.int16)


def cache_case(case_dir: Path, out: Path, normalisation: str = DEFAULT_NORMALISATION) -> Path:
    """Normalises one BraTS case folder (images + labels) into ``out/<case>/``
    (``normalisation``: one of :data:`model.defaults.NORMALISATIONS`).

    Raises:
        InputError: the case cannot be read, or has no label file (``not_found``).
    """
    label_file = find_label_file(case_dir)
    if label_file is None:
        raise InputError(
            "not_found",
            f"case {case_dir.name} has no label map (<case>_seg.nii.gz); training needs one",
            case_dir,
        )
    case = load_case(case_dir)
    labels = load_labels(label_file, like=case)
    images = to_canonical(case.images, case.affine)
    labels = to_canonical(labels, case.affine)
    prep = preprocess(images, normalisation=normalisation)
    target = labels_to_task_target(labels[prep.bbox], prep.mask).astype(np.uint8)
    pad = [(h, h) for h in HALF]
    images_p = np.pad(prep.images, [(0, 0), *pad]).astype(np.float16)
    target_p = np.pad(target, pad)
    dest = out / case.name
    dest.mkdir(parents=True, exist_ok=True)
    np.save(dest / "images.npy", images_p)
    np.save(dest / "target.npy", target_p)
    for k, centres in enumerate(_task_centres(target_p), start=1):
        np.save(dest / f"centres_{k}.npy", centres)
    meta = {
        "version": CACHE_VERSION,
        "name": case.name,
        "source": str(case_dir),
        "normalisation": normalisation,
        "shape": list(target_p.shape),
        "spacing": list(case.spacing),
        "voxels": {
            str(k): int(v) for k, v in zip(*np.unique(target, return_counts=True), strict=True)
        },
    }
    (dest / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks completion
    return dest


def _is_cached(folder: Path, source: Path, normalisation: str) -> bool:
    """A complete cache entry of this version, made from this very case folder with this
    normalisation (entries that name none were z-scored)."""
    meta = folder / "meta.json"
    if not meta.is_file():
        return False
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    return (
        info.get("version") == CACHE_VERSION
        and info.get("source") == str(source)
        and info.get("normalisation", "zscore") == normalisation
    )


def build_cache(
    case_dirs: Sequence[Path],
    cache_dir: str | Path,
    progress: Callable[[int, int, str], None] | None = None,
    normalisation: str = DEFAULT_NORMALISATION,
) -> list[CachedCase]:
    """Caches every case not cached yet (or cached with another normalisation) and opens
    them all (memory-mapped)."""
    cache = Path(cache_dir)
    cases = []
    for i, case_dir in enumerate(case_dirs):
        folder = cache / Path(case_dir).name
        if not _is_cached(folder, Path(case_dir), normalisation):
            cache_case(Path(case_dir), cache, normalisation)
        cases.append(CachedCase.open(folder))
        if progress is not None:
            progress(i + 1, len(case_dirs), folder.name)
    return cases


# --------------------------------------------------------------------------- sampling
@dataclass
class TaskBatch:
    """Patches and targets per task (None for an inactive task).

    images[k]: float32 (N_k, 4, 32, 32, 16); targets[k]: int64 (N_k, 32, 32, 16), 5-class
    for tasks 1-2, 0/1 (not ET / ET) for task 3. ``transferred`` counts the patches
    each task received from the preceding tasks by online transfer.
    """

    images: list[np.ndarray | None]
    targets: list[np.ndarray | None]
    transferred: tuple[int, int, int] = (0, 0, 0)


def tumour_fraction(target: np.ndarray) -> float:
    return float(np.isin(target, TUMOUR_CLASSES).mean())


def core_fraction(target: np.ndarray) -> float:
    return float(np.isin(target, CORE_CLASSES).mean())


def transfer_targets(target: np.ndarray, from_task: int) -> tuple[bool, bool]:
    """Whether a patch of task ``from_task`` (1 or 2) also trains task 2 and task 3.

    Eq. 1: a task-1 patch trains task 2 when >= 40 % of its voxels are tumour.
    Eq. 2: a task-1 or task-2 patch trains task 3 when >= 50 % of its voxels are core.
    """
    to2 = from_task == 1 and tumour_fraction(target) >= TRANSFER_TUMOUR
    to3 = from_task in (1, 2) and core_fraction(target) >= TRANSFER_CORE
    return to2, to3


def enhancing_target(target: np.ndarray) -> np.ndarray:
    """Task 3's binary target from a 5-class target: 1 where ET."""
    return (target == TaskClass.ENHANCING).astype(np.int64)


class PatchSampler:
    """Draws per-task patch batches from cached cases (see the module docstring).

    Args:
        cases: the cached training cases.
        batch_per_task: patches drawn per active task and step (20 in the paper).
        task1_tumour_fraction: share of task-1 centres drawn from task 2's region (the
            dilated tumour) instead of the whole brain. 0 (the default) is the paper;
            a positive share counters the rarity of tumour voxels in task-1 patches
            (about 4 %) when the training budget is far below the paper's.
        transfer: online training-data transfer on or off.
        seed: seed of the sampler's own random generator (its state is checkpointed).
        augment: patch augmentation (:mod:`model.training.augment`), or None (the paper) for none.
            Its draws come from a second generator (seeded from ``seed``, checkpointed
            too), so the patch positions are the same with and without it.
    """

    def __init__(
        self,
        cases: Sequence[CachedCase],
        batch_per_task: int = 20,
        transfer: bool = True,
        seed: int = 0,
        task1_tumour_fraction: float = 0.0,
        augment: AugmentConfig | None = None,
    ) -> None:
        if not cases:
            raise ValueError("cases must hold at least one cached case")
        if batch_per_task < 1:
            raise ValueError(f"batch_per_task must be >= 1; got {batch_per_task}")
        self.cases = list(cases)
        self.batch_per_task = batch_per_task
        if not 0.0 <= task1_tumour_fraction <= 1.0:
            raise ValueError(
                f"task1_tumour_fraction must lie in [0, 1]; got {task1_tumour_fraction!r}"
            )
        self.transfer = transfer
        self.task1_tumour_fraction = task1_tumour_fraction
        self.rng = np.random.default_rng(seed)
        self.augment = augment
        self.augment_rng = np.random.default_rng([seed, 1])
        self._eligible = [
            [i for i, c in enumerate(self.cases) if len(c.centres[k])] for k in range(3)
        ]

    def _draw(self, task: int) -> tuple[np.ndarray, np.ndarray]:
        # Not in the paper (see PatchSampler): some task-1 centres in task 2's region. The
        # random draw happens only when the option is on, so the paper's stream is intact.
        if (
            task == 0
            and self.task1_tumour_fraction > 0
            and self.rng.random() < self.task1_tumour_fraction
            and self._eligible[1]
        ):
            return self._draw_from(1)
        return self._draw_from(task)

    def _draw_from(self, task: int) -> tuple[np.ndarray, np.ndarray]:
        eligible = self._eligible[task]
        if not eligible:
            raise ValueError(f"no training case has candidate centres for task {task + 1}")
        case = self.cases[eligible[int(self.rng.integers(len(eligible)))]]
        centres = case.centres[task]
        c = centres[int(self.rng.integers(len(centres)))].astype(int)
        # Centres are in padded coordinates; the padding of HALF makes every patch fit.
        box = tuple(slice(x - h, x - h + p) for x, h, p in zip(c, HALF, PATCH, strict=True))
        images = np.asarray(case.images[(slice(None), *box)], dtype=np.float32)
        target = np.asarray(case.target[box], dtype=np.int64)
        if self.augment is not None:
            images, target = augment_patch(images, target, self.augment_rng, self.augment)
        return images, target

    def sample(self, active: Sequence[bool]) -> TaskBatch:
        """One step's patches for the active tasks (a sequence of three booleans)."""
        images: list[list[np.ndarray]] = [[], [], []]
        targets: list[list[np.ndarray]] = [[], [], []]
        moved = [0, 0, 0]
        for task in range(3):
            if not active[task]:
                continue
            for _ in range(self.batch_per_task):
                img, tgt = self._draw(task)
                images[task].append(img)
                targets[task].append(tgt)
                if not self.transfer or task == 2:
                    continue
                to2, to3 = transfer_targets(tgt, task + 1)
                if to2 and active[1]:
                    images[1].append(img)
                    targets[1].append(tgt)
                    moved[1] += 1
                if to3 and active[2]:
                    images[2].append(img)
                    targets[2].append(tgt)
                    moved[2] += 1
        batch = TaskBatch(
            images=[np.stack(i) if i else None for i in images],
            targets=[np.stack(t) if t else None for t in targets],
            transferred=(moved[0], moved[1], moved[2]),
        )
        if batch.targets[2] is not None:
            batch.targets[2] = enhancing_target(batch.targets[2])
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state,
            "augment_rng": self.augment_rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        if "augment_rng" in state:  # states written before augmentation existed lack it
            self.augment_rng.bit_generator.state = state["augment_rng"]
