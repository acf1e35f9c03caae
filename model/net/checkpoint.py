"""Checkpoint files: the architecture description, the weights and metadata in one file.

A checkpoint alone rebuilds its model. Layout (a ``torch.save`` dictionary of plain
types and tensors, loadable with ``weights_only=True``)::

    {"format": "omnet-checkpoint", "format_version": 1,
     "config": ArchConfig.to_dict(), "state_dict": {...},
     "metadata": {...}}   # free-form: training summary, validation figures, ...
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.atomic import atomic_write
from model.net.network import ArchConfig, build_model

#: An absolute path: POSIX (/srv/...) or Windows (C:\\... or C:/...).
_ABSOLUTE_PATH = re.compile(r"^(/|[A-Za-z]:[\\/])")

FORMAT = "omnet-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: unreadable, not ours, or an incompatible version."""


@dataclass
class CheckpointInfo:
    """What a checkpoint file says about its model, without building the network."""

    config: ArchConfig
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha256: str = ""

    @property
    def name(self) -> str:
        return self.path.name if self.path else "unsaved"


@dataclass(kw_only=True)
class Checkpoint(CheckpointInfo):
    """A loaded checkpoint: the rebuilt model and what the file said about it."""

    model: nn.Module


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    config: ArchConfig,
    metadata: dict[str, Any] | None = None,
    half: bool = False,
) -> Path:
    """Writes ``model`` with its ``config`` and ``metadata`` to ``path`` (atomically).

    Args:
        half: store floating-point weights as float16 (they are restored to float32
            on load); halves the file for bundling.
    """
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if half and value.is_floating_point():
            value = value.half()
        state[key] = value
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "state_dict": state,
        "metadata": dict(metadata or {}),
    }
    return atomic_save(payload, path)


def atomic_save(payload: Any, path: str | Path) -> Path:
    """``torch.save`` through :func:`model.atomic.atomic_write`: a reader never sees a
    half-written file, and a crash leaves the old one."""
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _read_payload(path: Path) -> tuple[dict[str, Any], str]:
    """The checkpoint file's dictionary, checked for our marker and format version, and
    the SHA-256 of the very bytes it was read from (a file replaced meanwhile, as a
    deployment does, cannot give the weights of one file the hash of another)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a .pt file")
    try:
        data = path.read_bytes()
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(
            f"checkpoint {path} could not be read ({type(exc).__name__}); is it an omnet .pt file?"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an omnet checkpoint (no '{FORMAT}' marker)")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}; this omnet reads version "
            f"{FORMAT_VERSION}. Use the omnet release that wrote it, or retrain."
        )
    return payload, hashlib.sha256(data).hexdigest()


def _info(path: Path, payload: dict[str, Any], sha256: str) -> CheckpointInfo:
    try:
        config = ArchConfig.from_dict(payload["config"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged or inconsistent: {exc}") from exc
    return CheckpointInfo(config, dict(payload.get("metadata") or {}), path, sha256)


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """What ``path`` holds (architecture, metadata, hash) without building its network.

    No tensor computation runs, so a process that will fork workers (a Celery prefork
    parent) can call it without starting PyTorch's OpenMP thread pool, which a forked
    child would inherit in a broken state.

    Raises:
        CheckpointError: as :func:`load_checkpoint`.
    """
    path = Path(path)
    return _info(path, *_read_payload(path))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuilds the model stored in ``path`` (in eval mode, on ``device``).

    Raises:
        CheckpointError: the file is missing, unreadable, not an omnet checkpoint, or
            written by an incompatible format version.
    """
    path = Path(path)
    payload, sha256 = _read_payload(path)
    info = _info(path, payload, sha256)
    try:
        model = build_model(info.config)
        state = {
            k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()
        }
        model.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged or inconsistent: {exc}") from exc
    model.to(device).eval()
    return Checkpoint(
        config=info.config,
        metadata=info.metadata,
        path=info.path,
        sha256=info.sha256,
        model=model,
    )


def describe_checkpoints(
    checkpoints: Sequence[CheckpointInfo], metadata: bool = True
) -> dict[str, Any]:
    """What a model made of ``checkpoints`` (one, or an ensemble) is, for reports.

    Returns:
        ``name`` (the file names joined by ``+``), ``sha256`` (the file's, or for an
        ensemble the first 16 hex digits of each joined by ``+``) and per checkpoint its
        name, sha256, variant, width and, with ``metadata``, its stored metadata. Paths
        on the machine are left out (absolute paths in the metadata become their last
        component): reports travel to other people.
    """
    return {
        "name": "+".join(c.name for c in checkpoints),
        "sha256": checkpoints[0].sha256
        if len(checkpoints) == 1
        else "+".join(c.sha256[:16] for c in checkpoints),
        "checkpoints": [
            {
                "name": c.name,
                "sha256": c.sha256,
                "variant": c.config.variant,
                "width": c.config.width,
                **({"metadata": _without_paths(c.metadata)} if metadata else {}),
            }
            for c in checkpoints
        ],
    }


def _without_paths(value: Any) -> Any:
    """``value`` with every absolute file path (a string) replaced by its last part."""
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_paths(v) for v in value]
    if isinstance(value, str) and _ABSOLUTE_PATH.match(value):
        return re.split(r"[\\/]", value.rstrip("\\/"))[-1]
    return value
