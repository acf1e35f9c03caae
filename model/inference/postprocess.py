"""Post-processing of predicted label maps (paper section III-D).

Two steps, applied in this order by :func:`postprocess`:

1. :func:`remove_small_components` deletes connected tumour components smaller than
   ``tau = min(2000, 0.1 * V_max)`` voxels, ``V_max`` being the largest component.
2. :func:`relabel_edema_kmeans` looks for cases with little enhancing tumour and, in
   each tumour component with little enhancing tumour, splits the edema voxels into
   two groups with K-means on their MRI intensities; the group with the lower mean
   T1ce intensity becomes NCR/NET. Only edema labels change.

The paper leaves two choices open, made here as follows:

* Connectivity: 26 by default, so that voxels of one lesion that touch only along an
  edge or at a corner stay one component (a prediction thinned by the network must not
  be broken into pieces that then fall under ``tau``). 6 and 18 are available.
* K-means features: the intensities of all four modalities at each edema voxel, taken
  as they come, i.e. already z-score normalised per modality, so no modality dominates
  by its raw scale. The T1ce channel is only used afterwards to name the dark group.

A third step is not in the paper: :func:`model.inference.lesions.keep_main_lesion` deletes tumour
components that lie far from the main lesion (see that module).

All functions are pure: they take label maps in the BraTS 2018 convention (0, 1, 2, 4;
see :func:`model.labels.to_brats2018`) and return new arrays, never modifying their
inputs.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Literal, cast

import cc3d
import numpy as np

from model.labels import EDEMA, NCR_NET, REGIONS

logger = logging.getLogger(__name__)

#: Connectivities accepted for 3D connected components (faces, +edges, +corners).
CONNECTIVITIES = (6, 18, 26)
#: A connectivity that :func:`_check_connectivity` has accepted (what cc3d takes).
Connectivity = Literal[6, 18, 26]


def _check_labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 3:
        raise ValueError(f"labels must be a 3D label map, got an array of shape {arr.shape}")
    return arr


def _check_connectivity(connectivity: int) -> Connectivity:
    """``connectivity`` itself, once checked to be one of :data:`CONNECTIVITIES`."""
    if isinstance(connectivity, bool) or connectivity not in CONNECTIVITIES:
        raise ValueError(
            f"connectivity must be one of {list(CONNECTIVITIES)}, got {connectivity!r}"
        )
    return cast(Connectivity, connectivity)


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


def _check_images(images: np.ndarray, shape: tuple[int, ...], t1ce_channel: int) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != len(shape) + 1 or arr.shape[1:] != shape:
        raise ValueError(
            f"images must have shape (C, *labels.shape) = (C, {', '.join(map(str, shape))}), "
            f"got {arr.shape}"
        )
    if isinstance(t1ce_channel, bool) or not 0 <= t1ce_channel < arr.shape[0]:
        raise ValueError(
            f"t1ce_channel must index one of the {arr.shape[0]} image channels, "
            f"got {t1ce_channel!r}"
        )
    return arr


def _tumour_components(
    labels: np.ndarray, connectivity: Connectivity
) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the whole tumour and their voxel counts.

    Returns:
        ``(components, sizes)``: an array of component ids (0 outside the tumour,
        1..N inside) and ``sizes[i]``, the voxel count of component ``i``
        (``sizes[0]`` counts the background).
    """
    components, n = cc3d.connected_components(labels != 0, connectivity=connectivity, return_N=True)
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    return components, sizes


def remove_small_components(
    labels: np.ndarray,
    connectivity: int = 26,
    max_size: int = 2000,
    fraction: float = 0.1,
) -> np.ndarray:
    """Removes connected tumour components smaller than ``tau`` (step 1).

    Components are those of the whole tumour (``labels != 0``). With ``V_max`` the
    voxel count of the largest component, ``tau = min(max_size, fraction * V_max)``
    and every component with fewer than ``tau`` voxels is set to background; a
    component of exactly ``tau`` voxels is kept.

    Args:
        labels: 3D label map (BraTS 2018 convention), not modified.
        connectivity: 6, 18 or 26. The default 26 keeps voxels of one lesion that
            touch only diagonally in one component.
        max_size: upper bound on ``tau`` in voxels (2000 in the paper).
        fraction: share of the largest component giving ``tau`` (0.1 in the paper).

    Returns:
        A new label map of the same shape and dtype.

    Raises:
        ValueError: ``labels`` is not 3D, or an argument is out of range.
    """
    arr = _check_labels(labels)
    checked_connectivity = _check_connectivity(connectivity)
    _check_non_negative("max_size", max_size)
    _check_fraction("fraction", fraction)

    out = np.array(arr, copy=True)
    components, sizes = _tumour_components(arr, checked_connectivity)
    if len(sizes) <= 1:
        return out
    v_max = int(sizes[1:].max())
    # size < min(max_size, fraction * v_max), written with a division so that a
    # component whose share of V_max equals ``fraction`` exactly is kept despite
    # rounding in the product (0.1 * 2990 > 299 in floating point).
    small = (sizes < max_size) & (sizes / v_max < fraction)
    small[0] = False
    n_small = int(small.sum())
    if n_small:
        out[small[components]] = 0
    logger.debug(
        "remove_small_components: %d components, V_max=%d, tau=%g, removed %d (%d voxels)",
        len(sizes) - 1,
        v_max,
        min(max_size, fraction * v_max),
        n_small,
        int(sizes[small].sum()),
    )
    return out


def relabel_edema_kmeans(
    labels: np.ndarray,
    images: np.ndarray,
    connectivity: int = 26,
    global_ratio: float = 0.1,
    component_ratio: float = 0.05,
    max_component_et: int = 1000,
    t1ce_channel: int = 1,
    random_state: int | None = 0,
    require_core: bool = False,
) -> np.ndarray:
    """Relabels dark edema as NCR/NET in tumours with little enhancing tumour (step 2).

    Nothing changes unless ``vol_ET / vol_WT < global_ratio`` over the whole case.
    Then, for each connected tumour component ``n`` with
    ``vol_ET(n) / vol_WT(n) < component_ratio`` and ``vol_ET(n) < max_component_et``,
    its edema voxels are clustered into two groups by K-means
    (``n_clusters=2, n_init=10``) on their intensities in every channel of
    ``images``, and the group with the lower mean T1ce intensity is relabelled
    NCR/NET. Components with fewer than two distinct edema intensity vectors are
    skipped. Only edema voxels ever change.

    Args:
        labels: 3D label map (BraTS 2018 convention), not modified.
        images: float array of shape ``(C, *labels.shape)``, normally the four
            modalities T1, T1ce, T2, FLAIR, each z-score normalised; not modified.
        connectivity: 6, 18 or 26, for the tumour components.
        global_ratio: threshold on the case's ET/WT volume ratio (0.1 in the paper).
        component_ratio: threshold on a component's ET/WT ratio (0.05 in the paper).
        max_component_et: threshold on a component's ET voxel count (1000 in the
            paper).
        t1ce_channel: index of the T1ce channel in ``images``.
        random_state: seed of K-means, for reproducible results.
        require_core: a guard, not in the paper: only components that already hold
            some tumour core (NCR/NET or ET) are relabelled, so that a component of
            edema alone (often a false positive far from the tumour) is never turned
            into core.

    Returns:
        A new label map of the same shape and dtype. A case without tumour comes
        back as an unchanged copy.

    Raises:
        ValueError: a shape does not match, an argument is out of range, or the
            intensities of voxels to cluster are not finite.
    """
    arr = _check_labels(labels)
    imgs = _check_images(images, arr.shape, t1ce_channel)
    checked_connectivity = _check_connectivity(connectivity)
    _check_fraction("global_ratio", global_ratio)
    _check_fraction("component_ratio", component_ratio)
    _check_non_negative("max_component_et", max_component_et)

    out = np.array(arr, copy=True)
    if _case_has_little_enhancing(arr, global_ratio):
        dark = _dark_edema_voxels(
            arr,
            imgs,
            checked_connectivity,
            component_ratio,
            max_component_et,
            t1ce_channel,
            random_state,
            require_core,
        )
        out.flat[dark] = NCR_NET
        logger.debug("relabel_edema_kmeans: %d edema voxels relabelled NCR/NET", dark.size)
    return out


def _dark_edema_voxels(
    labels: np.ndarray,
    images: np.ndarray,
    connectivity: Connectivity,
    component_ratio: float,
    max_component_et: int,
    t1ce_channel: int,
    random_state: int | None,
    require_core: bool = False,
) -> np.ndarray:
    """Flat indices of the dark edema voxels of every component with little ET.

    Arguments as for :func:`relabel_edema_kmeans`, already checked.
    """
    components, n_components = cc3d.connected_components(
        np.isin(labels, REGIONS["WT"]), connectivity=connectivity, return_N=True
    )
    edema = _edema_by_component(labels, components, n_components)
    channels = images.reshape(images.shape[0], -1)  # (C, voxels)
    dark_parts = [np.zeros(0, dtype=np.intp)]
    for comp, n_wt, n_et in _components_with_little_enhancing(
        labels, components, n_components, component_ratio, max_component_et, require_core
    ):
        dark = _dark_edema(channels, edema[comp], comp, t1ce_channel, random_state)
        if dark is None:
            continue
        dark_parts.append(dark)
        logger.debug(
            "relabel_edema_kmeans: component %d (WT %d, ET %d): %d of %d edema voxels -> NCR/NET",
            comp,
            n_wt,
            n_et,
            dark.size,
            edema[comp].size,
        )
    return np.concatenate(dark_parts)


def _case_has_little_enhancing(labels: np.ndarray, global_ratio: float) -> bool:
    """Whether the case has a tumour with ``vol_ET / vol_WT < global_ratio``."""
    vol_wt = int(np.isin(labels, REGIONS["WT"]).sum())
    if vol_wt == 0:
        return False
    vol_et = int(np.isin(labels, REGIONS["ET"]).sum())
    if not vol_et / vol_wt < global_ratio:
        logger.debug(
            "relabel_edema_kmeans: ET/WT = %d/%d, not below %g; unchanged",
            vol_et,
            vol_wt,
            global_ratio,
        )
        return False
    return True


def _components_with_little_enhancing(
    labels: np.ndarray,
    components: np.ndarray,
    n_components: int,
    component_ratio: float,
    max_component_et: int,
    require_core: bool = False,
) -> list[tuple[int, int, int]]:
    """The tumour components whose edema is to be split, as ``(id, vol_WT, vol_ET)``.

    A component qualifies when ``vol_ET / vol_WT < component_ratio`` and
    ``vol_ET < max_component_et`` (and, with ``require_core``, it holds a core voxel);
    ids run 1..``n_components`` in ``components``.
    """
    flat_components = components.ravel()
    wt_sizes = np.bincount(flat_components, minlength=n_components + 1)
    et = np.isin(labels, REGIONS["ET"]).ravel()
    et_sizes = np.bincount(flat_components[et], minlength=n_components + 1)
    core = np.isin(labels, REGIONS["TC"]).ravel()
    core_sizes = np.bincount(flat_components[core], minlength=n_components + 1)
    chosen = []
    for comp in range(1, n_components + 1):
        n_et, n_wt = int(et_sizes[comp]), int(wt_sizes[comp])
        if require_core and core_sizes[comp] == 0:
            continue
        if n_et / n_wt < component_ratio and n_et < max_component_et:
            chosen.append((comp, n_wt, n_et))
    return chosen


def _edema_by_component(
    labels: np.ndarray, components: np.ndarray, n_components: int
) -> list[np.ndarray]:
    """Flat indices of the edema voxels of each component id 0..``n_components``."""
    edema_idx = np.flatnonzero(labels == EDEMA)
    edema_comp = components.ravel()[edema_idx]
    order = np.argsort(edema_comp, kind="stable")
    edema_idx, edema_comp = edema_idx[order], edema_comp[order]
    starts = np.searchsorted(edema_comp, np.arange(n_components + 2))
    return [edema_idx[starts[c] : starts[c + 1]] for c in range(n_components + 1)]


def _dark_edema(
    channels: np.ndarray,
    voxels: np.ndarray,
    comp: int,
    t1ce_channel: int,
    random_state: int | None,
) -> np.ndarray | None:
    """The darker (in T1ce) of the two K-means groups of one component's edema voxels.

    Args:
        channels: image intensities ``(C, voxels)`` of the whole case.
        voxels: flat indices of the component's edema voxels.
        comp: the component's id, for messages.
        t1ce_channel: index of the T1ce channel in ``channels``.
        random_state: seed of K-means.

    Returns:
        Flat indices of the dark group, or None when the component is skipped: fewer
        than two edema voxels, a single intensity vector, or groups whose mean T1ce
        intensities tie.

    Raises:
        ValueError: an intensity of the edema voxels is not finite.
    """
    if voxels.size < 2:
        return None
    features = channels[:, voxels].T.astype(np.float64)  # (edema voxels, C)
    if not np.all(np.isfinite(features)):
        raise ValueError(
            f"images hold non-finite intensities at edema voxels of tumour component "
            f"{comp}; replace NaN/inf (e.g. with 0) before post-processing"
        )
    if np.all(features == features[0]):
        logger.debug("relabel_edema_kmeans: component %d has uniform edema; skipped", comp)
        return None
    from sklearn.cluster import KMeans  # 1-2 s to import: only when relabelling runs

    groups = KMeans(n_clusters=2, n_init=10, random_state=random_state).fit_predict(features)
    means = [features[groups == g, t1ce_channel].mean() for g in (0, 1)]
    if means[0] == means[1]:
        logger.debug("relabel_edema_kmeans: component %d groups tie on T1ce; skipped", comp)
        return None
    return voxels[groups == int(np.argmin(means))]


def postprocess(
    labels: np.ndarray,
    images: np.ndarray,
    remove_small: bool = True,
    relabel_edema: bool = True,
    connectivity: int = 26,
    relabel_guard: bool = False,
) -> np.ndarray:
    """Runs the paper's post-processing: small-component removal, then edema relabelling.

    Args:
        labels: 3D label map (BraTS 2018 convention), not modified.
        images: float array of shape ``(4, *labels.shape)``, modalities T1, T1ce,
            T2, FLAIR, each z-score normalised; not modified.
        remove_small: run :func:`remove_small_components` (step 1).
        relabel_edema: run :func:`relabel_edema_kmeans` (step 2).
        connectivity: 6, 18 or 26, used by both steps.
        relabel_guard: step 2 only in components that already hold tumour core
            (``require_core`` of :func:`relabel_edema_kmeans`; not in the paper).

    Returns:
        A new label map; with both steps off, an unchanged copy of ``labels``.

    Raises:
        ValueError: a shape does not match or ``connectivity`` is not 6, 18 or 26.
    """
    arr = _check_labels(labels)
    _check_images(images, arr.shape, t1ce_channel=1)
    _check_connectivity(connectivity)
    out = np.array(arr, copy=True)
    if remove_small:
        out = remove_small_components(out, connectivity=connectivity)
    if relabel_edema:
        out = relabel_edema_kmeans(
            out, images, connectivity=connectivity, require_core=relabel_guard
        )
    return out
