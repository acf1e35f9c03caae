"""The product's inference choices and their defaults, defined once.

Settings (``service/config.py``), the command line's choices and the API's schemas are
built from these names; :mod:`model.inference.pipeline` and
:mod:`model.inference.tiling` give them their meaning. This module imports nothing heavy,
so a command line can read it at start-up.
"""

from __future__ import annotations

from typing import Literal, get_args

#: Default gap of :func:`model.inference.lesions.keep_main_lesion`: tumour components
#: whose nearest voxel lies farther than this from the main lesion are removed. On the
#: multi-site validation split, gaps of 8 to 12 mm gave the same result and 15 mm kept a
#: false positive; in the reference labels of all 34 cases, foci of one tumour lie at most
#: 9.7 mm apart except one 774-voxel focus at 31 mm (1 % of that case's tumour).
MAIN_LESION_GAP_MM = 10.0

#: Post-processing modes (see :meth:`model.inference.pipeline.SegmentationOptions.for_postprocess`):
#: small-component removal, the guarded edema relabelling and the main lesion kept; the
#: same without the relabelling; the paper's two steps; the relabelling guarded to
#: tumours that hold core; small-component removal alone; nothing.
PostprocessMode = Literal[
    "main-lesion-relabel", "main-lesion", "paper", "guarded", "components", "none"
]
POSTPROCESS_MODES: tuple[PostprocessMode, ...] = get_args(PostprocessMode)
#: The product's post-processing: measured best out of fold (cases whose model never
#: trained on them, docs/training.md): on the 14 cases of the first two folds it gave
#: the same WT and ET Dice as ``main-lesion`` and a higher TC (0.653 against 0.617: the
#: relabelling found the core of a low-grade-looking tumour and changed no other case);
#: the third fold's 7 cases, scored after the choice, were unchanged by it.
DEFAULT_POSTPROCESS: PostprocessMode = "main-lesion-relabel"
#: The mode of a segmentation that asks for no post-processing (``--no-postprocess``, a
#: job sent with ``postprocess=false``).
NO_POSTPROCESS: PostprocessMode = "none"
#: What each mode does, in one phrase (the settings page, the API's schema and the
#: command line's help are written from these).
POSTPROCESS_MEANINGS: dict[PostprocessMode, str] = {
    "main-lesion-relabel": "small-component removal, the K-means edema relabelling in "
    "tumours that already hold core, then the main-lesion rule as in `main-lesion`; "
    "measured best out of fold",
    "main-lesion": "small-component removal, then tumour parts more than "
    f"{MAIN_LESION_GAP_MM:g} mm from the main lesion removed - a rim along the brain's edge "
    "is never the main lesion and the surest core is never removed - with a warning "
    "saying how much",
    "paper": "the paper's two steps: small-component removal and K-means edema relabelling",
    "guarded": "small-component removal, and the K-means edema relabelling only in "
    "tumours that already hold core",
    "components": "small-component removal alone: keeps distant foci of a multifocal tumour",
    "none": "no post-processing, the network's fused output as it is",
}

#: How the three tasks' probabilities become labels (see :mod:`model.inference.fusion`):
#: task 2's arg-max class (the paper's), region by region, or region by region with the
#: whole tumour voted by tasks 1 and 2 together.
FusionRule = Literal["argmax", "regions", "joint"]
FUSION_RULES: tuple[FusionRule, ...] = get_args(FusionRule)
#: The product's fusion: measured best out of fold (docs/training.md, "Fusion with both
#: tasks' whole tumour"): against the paper's arg-max, on all 34 cases scored by fold
#: models that never trained on them, TC +0.021 [+0.007, +0.036] (19 cases won, 7
#: lost), ET +0.008, WT +0.006, and the worst WT case no worse.
DEFAULT_FUSION: FusionRule = "joint"
#: Fusion of results stored before the rule was recorded: the arg-max was the only one.
LEGACY_FUSION: FusionRule = "argmax"
#: What each rule does, in one phrase (the settings page and the command line's help).
FUSION_MEANINGS: dict[FusionRule, str] = {
    "joint": "whole tumour where the mean of task 1's and task 2's tumour probabilities "
    "exceeds 0.5, core inside it where core outweighs edema; measured best out of fold",
    "regions": "whole tumour where task 2's tumour probability exceeds 0.5, core inside it "
    "where core outweighs edema",
    "argmax": "the paper's: task 2's most probable class inside task 1's dilated tumour",
}


def describe_fusion(mark: str = "`") -> str:
    """The fusion rules and what each does, as one line of prose."""
    return "; ".join(f"{mark}{rule}{mark} ({FUSION_MEANINGS[rule]})" for rule in FUSION_RULES)


#: The tilings the product offers (see :data:`model.inference.tiling.TILINGS`).
TilingName = Literal["wide", "paper"]
TILING_NAMES: tuple[TilingName, ...] = get_args(TilingName)
#: The product's tiling: the paper's patches, a wider kept centre.
DEFAULT_TILING: TilingName = "wide"
#: Tilings the product offered once and withdrew, with the reason a setting or an
#: argument naming one is refused (the layouts stay for benchmarks:
#: :data:`model.inference.tiling.LAYOUTS`).
WITHDRAWN_TILINGS = {
    "fast": "its 64 x 64 x 32 patches are larger than the 32 x 32 x 16 patches the network "
    "is trained on, and it over-segments (whole-tumour Dice 0.15-0.44 with the bundled "
    "model on three cases where 'wide' gives 0.83-0.95, docs/method.md)",
}


def tiling_name(value: object) -> TilingName:
    """``value`` when it names a tiling the product offers.

    Raises:
        ValueError: it does not (:func:`tiling_error` says why).
    """
    for name in TILING_NAMES:
        if value == name:
            return name
    raise ValueError(tiling_error(value))


def tiling_error(name: object) -> str:
    """Why ``name`` is not a tiling the product offers, in one line a person can act on."""
    offered = " or ".join(repr(n) for n in TILING_NAMES)
    if isinstance(name, str) and name in WITHDRAWN_TILINGS:
        return (
            f"tiling {name!r} was withdrawn: {WITHDRAWN_TILINGS[name]}; use {offered} "
            f"('{DEFAULT_TILING}' is the default)"
        )
    return f"tiling must be {offered}; got {name!r}"


#: Intensity normalisation of each modality inside the brain (see
#: :func:`model.inference.preprocess.normalise`): the paper's z-score; z-score after
#: clipping to the 0.5th-99.5th percentiles; or piecewise-linear histogram
#: standardisation of the percentile landmarks onto a standard-normal scale. A model is
#: trained with one and its checkpoint names it, so that inference uses the same.
Normalisation = Literal["zscore", "clipped", "landmarks"]
NORMALISATIONS: tuple[Normalisation, ...] = get_args(Normalisation)
#: The paper's normalisation; checkpoints that do not name one were trained with it.
DEFAULT_NORMALISATION: Normalisation = "zscore"

#: Training loss per task: the paper's per-voxel cross-entropy (the default, and what
#: runs that name none trained with), or that plus one minus a soft Dice over the regions
#: the product reads from the task (see :func:`model.training.trainer.task_losses`).
Loss = Literal["cross-entropy", "cross-entropy+dice"]
LOSSES: tuple[Loss, ...] = get_args(Loss)


#: Arithmetic of the network at inference: ``auto`` autocasts where the device computes
#: in half width natively (float16 on CUDA; bfloat16 on CPUs with AVX512-BF16 or AMX) and
#: stays in float32 elsewhere; ``float32`` never autocasts; ``mixed`` always does.
Precision = Literal["auto", "float32", "mixed"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
#: The product's precision: on the 21 out-of-fold cases measured, bfloat16 gave the same
#: mean Dice as float32 within 0.001 at 0.67x the CPU time per case.
DEFAULT_PRECISION: Precision = "auto"

#: Test-time augmentation (see :data:`model.inference.tiling.TTA_PASSES`): none; the
#: left-right mirror (two network passes); all eight mirrorings (eight passes).
TtaMode = Literal["off", "mirror", "all"]
TTA_MODES: tuple[TtaMode, ...] = get_args(TtaMode)
#: The product's test-time augmentation: out of fold on all 34 cases (docs/training.md)
#: the mirror added 0.009 WT and 0.006 TC Dice (paired intervals above 0; no case lost
#: more than 0.01 WT) at 1.9x the inference time, 0.88x SegResNet's CPU time in all
#: (float32, on a CPU without AVX512-BF16).
DEFAULT_TTA: TtaMode = "mirror"
#: What each mode costs, for the command line's and the settings' help.
TTA_MEANINGS: dict[TtaMode, str] = {
    "off": "one network pass",
    "mirror": "the mean of the image and its left-right mirror, 2x inference",
    "all": "the mean over all eight mirrorings, 8x inference",
}


def describe_tta(mark: str = "`") -> str:
    """The modes and what each costs, for help texts."""
    return "; ".join(f"{mark}{mode}{mark} ({meaning})" for mode, meaning in TTA_MEANINGS.items())


_TTA_BOOLEANS = {
    "true": "all",
    "1": "all",
    "yes": "all",
    "on": "all",
    "false": "off",
    "0": "off",
    "no": "off",
}


def tta_mode(value: object) -> TtaMode:
    """A test-time augmentation mode from a mode's name, or from a boolean (or its text:
    ``true``, ``1``, ``yes``, ``on``: ``all``; ``false``, ``0``, ``no``: ``off``), as
    the setting and the predictor took before there were modes.

    Raises:
        ValueError: anything else, naming the modes.
    """
    if isinstance(value, bool):
        return "all" if value else "off"
    if isinstance(value, str):
        text = value.strip().lower()
        for mode in TTA_MODES:
            if text == mode:
                return mode
        if text in _TTA_BOOLEANS:
            return tta_mode(_TTA_BOOLEANS[text])
    names = ", ".join(repr(m) for m in TTA_MODES)
    raise ValueError(f"tta must be one of {names} (or true / false); got {value!r}")


def describe_postprocess(modes: tuple[PostprocessMode, ...] = POSTPROCESS_MODES) -> str:
    """``modes`` and what each does, as one line of prose (Markdown: names in backticks)."""
    return "; ".join(f"`{mode}` ({POSTPROCESS_MEANINGS[mode]})" for mode in modes)
