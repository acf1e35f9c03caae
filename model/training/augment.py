"""Patch-level data augmentation for training, cheap enough for a CPU.

The paper trains without augmentation; the product's model adds it because the
training cases come from few scanners. The set follows nnU-Net's default training
transforms where they fit a 32 x 32 x 16 patch of z-scored MRI:

==========================  ==============  =========================================
transform                   probability     parameters
==========================  ==============  =========================================
mirror, each axis           0.5 per axis    moves image and labels together
Gaussian noise              0.1             variance U(0, 0.1)
Gaussian blur               0.2 / channel   sigma U(0.5, 1.0) voxels
brightness (multiplicative) 0.15 / channel  factor U(0.75, 1.25)
contrast                    0.15 / channel  factor U(0.75, 1.25), around the mean
intensity shift             0.15 / channel  U(-0.1, 0.1) standard deviations
gamma                       0.3 / channel   gamma U(0.7, 1.5); 0.1 of them inverted
==========================  ==============  =========================================

Two further transforms imitate other scanners and are off unless asked for
(:meth:`AugmentConfig.site_shift`, ``omnet train --augment site``), which also widens the
intensity ranges above:

==========================  ==============  =========================================
transform                   probability     parameters
==========================  ==============  =========================================
bias field                  0.3 / channel   smooth multiplicative field
                                            exp(sum of linear and quadratic terms),
                                            up to +-30 % over a patch
low resolution              0.25 / channel  down-sampled along one random axis by
                                            U(1.5, 3), linearly up-sampled back
==========================  ==============  =========================================

A bias field multiplies raw intensities, but patches are z-scored: with ``x = (I - m) / s``
the biased value is ``x b + (m / s)(b - 1)``; ``m / s`` is drawn from U(1.5, 4), the range
of the brain's mean-to-standard-deviation ratio in the real cases.

Spatial rotation, scaling and elastic deformation (nnU-Net's costliest transforms) are
left out: they need resampling of every patch, which costs more than a training step's
forward pass on a CPU, and the patches are already drawn at random positions.

Intensity transforms change voxels inside the brain only (the target's non-background
voxels); outside stays 0, as the pre-processing leaves it. Every draw comes from the
generator passed in, so a seeded generator gives the same patches again, and a
checkpointed generator state resumes the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from model.labels import TaskClass


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the patch augmentation (see the module docstring)."""

    mirror: float = 0.5
    noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)
    blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    shift: float = 0.15
    shift_range: tuple[float, float] = (-0.1, 0.1)
    gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    gamma_invert: float = 0.1
    bias: float = 0.0
    bias_strength: float = 0.3
    bias_offset: tuple[float, float] = (1.5, 4.0)
    low_resolution: float = 0.0
    low_resolution_factor: tuple[float, float] = (1.5, 3.0)

    @classmethod
    def site_shift(cls) -> AugmentConfig:
        """The default set plus what imitates other scanners: bias fields, low
        resolution, and wider noise, blur, contrast and gamma (see the module docstring)."""
        return cls(
            noise=0.15,
            noise_variance=(0.0, 0.15),
            blur=0.2,
            blur_sigma=(0.5, 1.5),
            contrast=0.3,
            contrast_range=(0.65, 1.5),
            gamma=0.3,
            gamma_range=(0.6, 1.7),
            bias=0.3,
            low_resolution=0.25,
        )

    def __post_init__(self) -> None:
        probabilities = ("mirror", "noise", "blur", "brightness", "contrast", "shift", "gamma")
        for name in (*probabilities, "bias", "low_resolution"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} probability must lie in [0, 1]; got {value!r}")
        if not 0.0 <= self.gamma_invert <= 1.0:
            raise ValueError(f"gamma_invert must lie in [0, 1]; got {self.gamma_invert!r}")
        if self.gamma_range[0] <= 0:
            raise ValueError(f"gamma_range must be positive; got {self.gamma_range!r}")
        if not 0.0 <= self.bias_strength < 1.0:
            raise ValueError(f"bias_strength must lie in [0, 1); got {self.bias_strength!r}")
        if self.low_resolution_factor[0] < 1.0:
            raise ValueError(
                f"low_resolution_factor must be >= 1; got {self.low_resolution_factor!r}"
            )


def augment_patch(
    images: np.ndarray,
    target: np.ndarray,
    rng: np.random.Generator,
    config: AugmentConfig = AugmentConfig(),
) -> tuple[np.ndarray, np.ndarray]:
    """One randomly augmented copy of a training patch.

    Args:
        images: float32 ``(C, X, Y, Z)`` z-scored modalities, 0 outside the brain.
        target: ``(X, Y, Z)`` 5-class target (:class:`~model.labels.TaskClass`); its
            background class marks the voxels outside the brain.
        rng: the random generator every draw comes from.
        config: probabilities and ranges.

    Returns:
        New ``(images, target)`` arrays; the inputs are not modified.
    """
    images = np.array(images, dtype=np.float32)
    target = np.array(target)
    if images.ndim != 4 or images.shape[1:] != target.shape:
        raise ValueError(
            f"images must be (C, X, Y, Z) and target (X, Y, Z) on the same grid; "
            f"got {images.shape} and {target.shape}"
        )
    for axis in range(3):
        if rng.random() < config.mirror:
            images = np.flip(images, axis=axis + 1)
            target = np.flip(target, axis=axis)
    images, target = np.ascontiguousarray(images), np.ascontiguousarray(target)
    brain = target != TaskClass.BACKGROUND
    if not brain.any():
        return images, target
    if rng.random() < config.noise:
        variance = rng.uniform(*config.noise_variance)
        noise = rng.normal(0.0, np.sqrt(variance), size=images.shape).astype(np.float32)
        images = images + noise * brain
    for c in range(images.shape[0]):
        images[c] = _augment_channel(images[c], brain, rng, config)
    return images, target


def _augment_channel(
    channel: np.ndarray, brain: np.ndarray, rng: np.random.Generator, config: AugmentConfig
) -> np.ndarray:
    out = channel.copy()
    if rng.random() < config.low_resolution:
        out = np.where(brain, _low_resolution(out, rng, config), out).astype(np.float32)
    if rng.random() < config.bias:
        field = bias_field(out.shape, rng, config.bias_strength)
        offset = rng.uniform(*config.bias_offset)
        out = np.where(brain, out * field + offset * (field - 1.0), out).astype(np.float32)
    if rng.random() < config.blur:
        sigma = rng.uniform(*config.blur_sigma)
        out = np.where(brain, gaussian_filter(out, sigma), out).astype(np.float32)
    values = out[brain]
    if rng.random() < config.brightness:
        values = values * rng.uniform(*config.brightness_range)
    if rng.random() < config.contrast:
        mean = values.mean()
        values = (values - mean) * rng.uniform(*config.contrast_range) + mean
    if rng.random() < config.shift:
        values = values + rng.uniform(*config.shift_range)
    if rng.random() < config.gamma:
        values = _gamma(
            values, rng.uniform(*config.gamma_range), rng.random() < config.gamma_invert
        )
    out[brain] = values
    return out


def _gamma(values: np.ndarray, gamma: float, invert: bool) -> np.ndarray:
    """Gamma on the values' own range, which is kept (nnU-Net's GammaTransform)."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-6:
        return values
    unit = (values - lo) / (hi - lo)
    if invert:
        unit = 1.0 - unit
    unit = unit**gamma
    if invert:
        unit = 1.0 - unit
    return (unit * (hi - lo) + lo).astype(np.float32)


def bias_field(shape: tuple[int, ...], rng: np.random.Generator, strength: float) -> np.ndarray:
    """A smooth positive field over a patch: exp of a random quadratic polynomial in
    the normalised coordinates, scaled so that it stays within ``1 +- strength``."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    grid = np.meshgrid(*axes, indexing="ij")
    log_field = np.zeros(shape, dtype=np.float32)
    for g in grid:
        log_field += rng.uniform(-1, 1) * g + rng.uniform(-1, 1) * (g * g - 1 / 3)
    peak = float(np.abs(log_field).max())
    if peak > 0:
        log_field *= np.log1p(strength) / peak
    field = np.exp(log_field)
    return np.clip(field, 1.0 - strength, 1.0 + strength).astype(np.float32)


def _low_resolution(
    channel: np.ndarray, rng: np.random.Generator, config: AugmentConfig
) -> np.ndarray:
    """The channel down-sampled along one random axis and linearly up-sampled back."""
    axis = int(rng.integers(channel.ndim))
    n = channel.shape[axis]
    factor = rng.uniform(*config.low_resolution_factor)
    coarse = max(2, round(n / factor))
    if coarse >= n:
        return channel
    fine_at = np.linspace(0.0, n - 1.0, coarse)  # where the coarse samples lie
    moved = np.moveaxis(channel, axis, 0)
    low = np.stack([_interp_slab(moved, x) for x in fine_at])
    back = np.stack([_interp_slab(low, x * (coarse - 1) / (n - 1)) for x in range(n)])
    return np.moveaxis(back, 0, axis).astype(np.float32)


def _interp_slab(volume: np.ndarray, x: float) -> np.ndarray:
    """Linear interpolation of ``volume`` along axis 0 at position ``x``."""
    lo = int(np.floor(x))
    hi = min(lo + 1, volume.shape[0] - 1)
    weight = x - lo
    return (1.0 - weight) * volume[lo] + weight * volume[hi]
