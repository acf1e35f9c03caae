"""Whole-case segmentation: a loaded case in, a BraTS label map on its own grid out.

Stages (each timed): reorient to the closest canonical (RAS) orientation, so that the
network always sees axial slices along its depth axis whatever the file's orientation;
pre-process (brain mask, normalisation inside it as the model was trained, crop to
the brain); overlap-tile inference
of the three tasks; fusion; post-processing; paste back onto the grid and undo the
reorientation. Geometry never changes: the result has the input's shape, and writing
it with :func:`model.io.nifti.write.save_labels` keeps the input's affine and header.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from model.defaults import (
    DEFAULT_FUSION,
    DEFAULT_PRECISION,
    DEFAULT_TTA,
    MAIN_LESION_GAP_MM,
    NO_POSTPROCESS,
    POSTPROCESS_MODES,
)
from model.inference.fusion import (
    DILATION_VOXELS,
    FusionRule,
    RegionThresholds,
    coarse_tumour,
    fuse,
    fused_probabilities,
    fusion_region,
    task2_core_and_tumour,
)
from model.inference.lesions import Quality, assess, keep_main_lesion
from model.inference.postprocess import postprocess
from model.inference.preprocess import Preprocessed, paste, preprocess
from model.inference.tiling import (
    WIDE_TILING,
    Predictor,
    ProgressCallback,
    TaskProbabilities,
    TileLayout,
    resolve_device,
    resolve_precision,
)
from model.io.nifti.write import save_labels, save_probabilities
from model.io.volumes import MODALITIES, Case
from model.net.checkpoint import Checkpoint, load_checkpoint

logger = logging.getLogger(__name__)

_RAS = nib.orientations.axcodes2ornt(("R", "A", "S"))


@dataclass(frozen=True)
class SegmentationOptions:
    """What to compute beyond the label map. The defaults are the product's
    (``for_postprocess(DEFAULT_POSTPROCESS)``); ``for_postprocess("paper")`` is the paper's.

    Attributes:
        remove_small: post-processing step 1 (small-component removal).
        relabel_edema: post-processing step 2 (K-means edema relabelling).
        relabel_guard: step 2 only in tumour components that already hold core (not in
            the paper; see :func:`model.inference.postprocess.relabel_edema_kmeans`).
        main_lesion_gap_mm: after the other steps, remove tumour components farther than
            this from the largest (None: keep them; not in the paper, see
            :func:`model.inference.lesions.keep_main_lesion`).
        main_lesion_guard: shells along the brain's edge are never the main lesion and
            the component surest of core is never removed (False: the largest component
            is the main lesion and any other may go).
        spare_shells: the component surest of core is spared even when it is a shell
            along the brain's edge (the earlier rule; False: the surest among the
            components that are not shells, where one holds confident core; see
            :func:`model.inference.lesions.keep_main_lesion`).
        probabilities: also return the fused per-class probabilities.
        dilation: radius (voxels) of the dilation of task 1's coarse tumour.
        fusion: how the tasks' probabilities become labels
            (:data:`model.defaults.FusionRule`; the product's is
            :data:`model.defaults.DEFAULT_FUSION`, ``argmax`` is the paper's).
        thresholds: where the fusion draws its lines
            (:class:`model.inference.fusion.RegionThresholds`; 0.5 each by default).
    """

    remove_small: bool = True
    relabel_edema: bool = True
    relabel_guard: bool = True
    main_lesion_gap_mm: float | None = MAIN_LESION_GAP_MM
    main_lesion_guard: bool = True
    spare_shells: bool = False
    probabilities: bool = False
    dilation: float = DILATION_VOXELS
    fusion: FusionRule = DEFAULT_FUSION
    thresholds: RegionThresholds = field(default_factory=RegionThresholds)

    @classmethod
    def for_postprocess(
        cls, mode: str, probabilities: bool = False, fusion: FusionRule = DEFAULT_FUSION
    ) -> SegmentationOptions:
        """The options of a post-processing mode of :data:`POSTPROCESS_MODES`, with the
        fusion rule ``fusion``.

        Raises:
            ValueError: an unknown mode.
        """
        if mode not in POSTPROCESS_MODES:
            raise ValueError(f"postprocess must be one of {POSTPROCESS_MODES}; got {mode!r}")
        relabel = mode in ("paper", "guarded", "main-lesion-relabel")
        main_lesion = mode in ("main-lesion", "main-lesion-relabel")
        return cls(
            remove_small=mode != NO_POSTPROCESS,
            relabel_edema=relabel,
            relabel_guard=mode in ("guarded", "main-lesion-relabel"),
            main_lesion_gap_mm=MAIN_LESION_GAP_MM if main_lesion else None,
            probabilities=probabilities,
            fusion=fusion,
        )


@dataclass
class Segmentation:
    """The result of segmenting one case, on the case's own grid.

    Attributes:
        labels: uint8 (X, Y, Z), BraTS 2018 convention (0, 1, 2, 4).
        probabilities: float32 (4, X, Y, Z) for background, NCR/NET, edema and ET, or None.
        timings: seconds per stage.
        warnings: what the user should know about the result (e.g. tumour removed by
            post-processing).
        quality: signs of a likely failure (see :func:`model.inference.lesions.assess`).
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    quality: Quality = field(default_factory=Quality)


def to_canonical(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(..., X, Y, Z) in the file's orientation -> closest RAS orientation."""
    ornt = nib.orientations.io_orientation(affine)
    return _apply(volume, ornt)


def from_canonical(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_canonical`."""
    back = nib.orientations.ornt_transform(_RAS, nib.orientations.io_orientation(affine))
    return _apply(volume, back)


def _apply(volume: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    lead = volume.ndim - 3
    if lead == 0:
        return np.ascontiguousarray(nib.orientations.apply_orientation(volume, ornt))
    moved = np.moveaxis(volume, tuple(range(lead)), tuple(range(-lead, 0)))  # channels last
    out = nib.orientations.apply_orientation(moved, ornt)
    return np.ascontiguousarray(np.moveaxis(out, tuple(range(-lead, 0)), tuple(range(lead))))


def segment_images(
    images: np.ndarray,
    affine: np.ndarray,
    predictor: Predictor,
    options: SegmentationOptions | None = None,
    progress: ProgressCallback | None = None,
) -> Segmentation:
    """Segments four modality volumes (4, X, Y, Z) on a grid described by ``affine``."""
    timings: dict[str, float] = {}
    start = time.perf_counter()

    canonical = to_canonical(images, affine)
    prep = preprocess(canonical, normalisation=predictor.normalisation)
    timings["preprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    probs: TaskProbabilities = predictor.predict(prep.images, prep.mask, progress)
    timings["inference"] = time.perf_counter() - start
    return label_probabilities(probs, prep, affine, options, timings)


def label_probabilities(
    probs: TaskProbabilities,
    prep: Preprocessed,
    affine: np.ndarray,
    options: SegmentationOptions | None = None,
    timings: dict[str, float] | None = None,
) -> Segmentation:
    """The stages after the network: fusion, post-processing, the quality assessment and
    the paste back onto the grid of ``affine``.

    Args:
        probs: the network's probabilities on the crop of ``prep``.
        prep: the pre-processed case (:func:`model.inference.preprocess.preprocess` of
            the canonical images).
        affine: the case's affine (the result is on its grid).
        options: fusion and post-processing.
        timings: stage timings so far, extended in place and returned in the result.
    """
    options = options or SegmentationOptions()
    timings = {} if timings is None else timings
    start = time.perf_counter()
    coarse = coarse_tumour(probs)
    region = fusion_region(probs, prep.mask, options.dilation, coarse)
    labels = fuse(probs, region=region, rule=options.fusion, thresholds=options.thresholds)
    fused = (
        fused_probabilities(probs, region=region, rule=options.fusion)
        if options.probabilities
        else None
    )
    del region
    core, whole = task2_core_and_tumour(probs)
    del probs
    timings["fusion"] = time.perf_counter() - start

    start = time.perf_counter()
    if options.remove_small or options.relabel_edema:
        labels = postprocess(
            labels,
            prep.images,
            remove_small=options.remove_small,
            relabel_edema=options.relabel_edema,
            relabel_guard=options.relabel_guard,
        )
    warnings = []
    removed: list[int] = []
    spacing = canonical_spacing(affine)
    if options.main_lesion_gap_mm is not None:
        labels, removed = keep_main_lesion(
            labels,
            spacing,
            options.main_lesion_gap_mm,
            brain=prep.mask,
            core_probability=core,
            guard=options.main_lesion_guard,
            spare_shells=options.spare_shells,
        )
        if removed:
            warnings.append(_removed_warning(removed, affine, options.main_lesion_gap_mm))
    timings["postprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    quality = assess(labels, spacing, prep.mask, sum(removed), core, whole, coarse)
    del core, whole, coarse
    if quality.review_recommended:
        warnings.append(str(quality.warning()))
    timings["quality"] = time.perf_counter() - start

    start = time.perf_counter()
    labels = from_canonical(paste(labels, prep), affine)
    if fused is not None:
        full = paste(fused, prep)
        full[0][np.all(full == 0, axis=0)] = 1.0  # outside the crop: background
        fused = from_canonical(full, affine)
    timings["paste"] = time.perf_counter() - start
    return Segmentation(
        labels=labels, probabilities=fused, timings=timings, warnings=warnings, quality=quality
    )


def canonical_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the axes of :func:`to_canonical`'s result."""
    sizes = nib.affines.voxel_sizes(affine)
    ornt = nib.orientations.io_orientation(affine)
    out = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(ornt):
        out[int(target)] = float(sizes[axis])
    return (out[0], out[1], out[2])


def _removed_warning(removed: list[int], affine: np.ndarray, gap_mm: float) -> str:
    voxel_ml = float(np.prod(nib.affines.voxel_sizes(affine))) / 1000.0
    volume = sum(removed) * voxel_ml
    parts = "part" if len(removed) == 1 else "parts"
    return (
        f"post-processing removed {len(removed)} predicted tumour {parts} ({volume:.1f} mL) "
        f"lying more than {gap_mm:g} mm from the main lesion; for a multifocal tumour, "
        "segment again with postprocess 'components' to keep them"
    )


def segment_case(
    case: Case,
    predictor: Predictor,
    options: SegmentationOptions | None = None,
    progress: ProgressCallback | None = None,
) -> Segmentation:
    """Segments a loaded :class:`~model.io.volumes.Case` on its own grid."""
    return segment_images(case.images, case.affine, predictor, options, progress)


def load_predictor(
    checkpoints: Sequence[str | Path],
    device: str = "auto",
    batch_size: int = 16,
    layout: TileLayout = WIDE_TILING,
    tta: bool | str = DEFAULT_TTA,
    precision: str = DEFAULT_PRECISION,
) -> tuple[Predictor, list[Checkpoint]]:
    """Loads one checkpoint, or several as an ensemble, into a :class:`Predictor`
    (``tta``: mirrored test-time augmentation, as :class:`Predictor` takes it; ``precision``: one of
    :data:`model.defaults.PRECISIONS`, see :func:`~model.inference.tiling.resolve_precision`).

    Raises:
        CheckpointError: a file cannot be used.
        ValueError: a checkpoint holds a single ``mc`` network, which predicts one task
            only (use an ``mc_cascade`` checkpoint for the MC baseline); or the checkpoints
            of an ensemble were trained on differently normalised inputs.
    """
    loaded = [load_checkpoint(path) for path in checkpoints]
    for ckpt in loaded:
        if ckpt.config.variant == "mc":
            raise ValueError(
                f"checkpoint {ckpt.name} holds one single-task 'mc' network; whole-case "
                "segmentation needs all three tasks (an OM-Net or 'mc_cascade' checkpoint)"
            )
    if len({c.config.normalisation for c in loaded}) > 1:
        named = ", ".join(f"{c.path or c.name}: {c.config.normalisation}" for c in loaded)
        raise ValueError(
            f"an ensemble's models must share one input normalisation; these differ ({named})"
        )
    resolved = resolve_device(device)
    predictor = Predictor(
        [c.model for c in loaded],
        resolved,
        batch_size,
        layout,
        tta=tta,
        mixed_precision=resolve_precision(precision, resolved),
        normalisation=loaded[0].config.normalisation,
    )
    return predictor, loaded


def write_segmentation(
    seg: Segmentation,
    case: Case,
    labels_path: Path,
    probabilities_path: Path | None = None,
    preview_path: Path | None = None,
    et_label: int = 4,
) -> dict[str, Path]:
    """Writes a case's label map, its probabilities (when computed and a path is given)
    and a FLAIR overlay preview (when a path is given); returns kind -> written file."""
    from model.io.preview import save_preview

    written = {"segmentation": save_labels(seg.labels, case, labels_path, et_label)}
    if seg.probabilities is not None and probabilities_path is not None:
        written["probabilities"] = save_probabilities(seg.probabilities, case, probabilities_path)
    if preview_path is not None:
        flair = case.images[MODALITIES.index("flair")]
        written["preview"] = save_preview(flair, seg.labels, case.affine, preview_path)
    return written
