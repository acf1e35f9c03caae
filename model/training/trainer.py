"""Curriculum training of OM-Net with online training-data transfer (paper III-B, IV-C).

Stages: task 1 alone, then tasks 1 + 2, then all three (1 / 1 / 18 epochs by default);
per-task batches go through the shared backbone together and are sliced back per task
(``forward_train``). SGD with momentum 0.99, weight decay 5e-4, learning rate 1e-3
halved every 4 epochs; per-voxel cross-entropy per task, weights 1:1:1 (with
``loss="cross-entropy+dice"``, not in the paper, each task adds one minus a soft Dice
over the regions the product reads from it).

Ablations of Table I: ``curriculum=False`` trains every task from the first step
(OM-Net0 without transfer, OM-Net^d with it); the ``mc_cascade`` variant trains three
independent single-task networks (no curriculum, no transfer); ``omnet_se``,
``omnet_cga`` and ``omnet_cga_minus`` change the network.

An epoch is ``steps_per_epoch`` steps of freshly sampled patches. A run directory holds
``run.json`` (the run's configuration, data folders and split, written by ``omnet train``
when it starts the run), ``state.pt`` (everything needed to resume: weights, optimiser,
position in the schedule, sampler and torch random states, history), ``train.jsonl``
(one JSON record per logged step and per validation), ``best.pt`` and ``last.pt``
(model checkpoints).
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F_

from model.defaults import LOSSES
from model.evaluation.metrics import evaluate_case
from model.inference.pipeline import SegmentationOptions, segment_case
from model.inference.tiling import TILINGS, Predictor, to_network
from model.io.volumes import Case
from model.labels import CORE_CLASSES, TUMOUR_CLASSES, EnhancingClass
from model.net.checkpoint import atomic_save, load_checkpoint, save_checkpoint
from model.net.network import ArchConfig, MCCascade, OMNet, build_model
from model.training.config import (
    STATE_VERSION,
    TASK_NAMES,
    TrainConfig,
    TrainingInterruptedError,
    TrainState,
)
from model.training.data import PatchSampler, TaskBatch, institution_group

#: Per task, the regions (each a set of the task's classes) that the product reads from
#: it: task 1's whole tumour (the gate, and half of the whole-tumour vote), task 2's whole
#: tumour and core, task 3's enhancing tumour. The Dice term of the loss is theirs.
DICE_REGIONS: tuple[tuple[tuple[int, ...], ...], ...] = (
    (TUMOUR_CLASSES,),
    (TUMOUR_CLASSES, CORE_CLASSES),
    ((int(EnhancingClass.ENHANCING),),),
)


#: Keeps the soft Dice defined (1) where neither prediction nor target holds the region.
DICE_SMOOTH = 1e-5


def soft_region_dice(
    scores: torch.Tensor, target: torch.Tensor, regions: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Mean over ``regions`` of the soft Dice between the softmax's probability of the
    region (the sum of its classes') and the target's region, pooled over the whole batch
    (so a patch without the region costs only its false positives).

    Args:
        scores: logits (B, C, ...).
        target: class indices (B, ...).
        regions: each a sequence of class indices.
    """
    probs = scores.float().softmax(1)
    dices = []
    for classes in regions:
        index = torch.tensor(list(classes), device=target.device)
        predicted = probs.index_select(1, index).sum(1)
        truth = torch.isin(target, index).to(predicted.dtype)
        overlap = (predicted * truth).sum()
        dices.append((2 * overlap + DICE_SMOOTH) / (predicted.sum() + truth.sum() + DICE_SMOOTH))
    return torch.stack(dices).mean()


def task_losses(
    outputs: Sequence[torch.Tensor | None],
    batch: TaskBatch,
    device: torch.device,
    loss: str = LOSSES[0],
) -> list[torch.Tensor | None]:
    """Each active task's loss (network layout (B, C, Z, X, Y)): per-voxel cross-entropy
    (the paper), plus ``1 - soft_region_dice`` over :data:`DICE_REGIONS` when ``loss`` is
    ``"cross-entropy+dice"``."""
    losses: list[torch.Tensor | None] = []
    for scores, target, regions in zip(outputs, batch.targets, DICE_REGIONS, strict=True):
        if scores is None or target is None:
            losses.append(None)
            continue
        t = torch.from_numpy(target).to(device).permute(0, 3, 1, 2)  # (B, X, Y, Z) -> (B, Z, X, Y)
        value = F_.cross_entropy(scores.float(), t)
        if loss == "cross-entropy+dice":
            value = value + (1 - soft_region_dice(scores, t, regions))
        losses.append(value)
    return losses


@dataclass(frozen=True)
class _Budget:
    """The limits of one :meth:`Trainer.fit` call, counted from ``started``."""

    started: float  # time.monotonic() at the start
    max_seconds: float | None
    max_steps: int | None

    def exhausted(self, steps_done: int) -> str | None:
        """Which budget has run out (``"time budget"``, ``"step budget"``), or None."""
        if self.max_seconds is not None and time.monotonic() - self.started >= self.max_seconds:
            return "time budget"
        if self.max_steps is not None and steps_done >= self.max_steps:
            return "step budget"
        return None


def _build_trainable(arch: ArchConfig) -> OMNet | MCCascade:
    """The network to train: one of the variants with per-task batches (``forward_train``)."""
    model = build_model(arch)
    if not isinstance(model, (OMNet, MCCascade)):
        raise ValueError(
            f"variant {arch.variant!r} takes no per-task batches; train the MC baseline as "
            "'mc_cascade'"
        )
    return model


class Trainer:
    """Trains one network on a sampler; checkpoints, validates, resumes.

    Args:
        config: the recipe.
        sampler: draws the patches.
        run_dir: where state, logs and checkpoints go.
        validation: (case, reference labels) pairs to validate on at the end of each epoch
            with the whole-case pipeline.
        device: torch device.
        data_summary: free-form description of the training data, stored in checkpoints.
    """

    def __init__(
        self,
        config: TrainConfig,
        sampler: PatchSampler,
        run_dir: str | Path,
        validation: Sequence[tuple[Case, np.ndarray]] = (),
        device: str | torch.device = "cpu",
        data_summary: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.sampler = sampler
        self.run_dir = Path(run_dir)
        self.validation = list(validation)
        self.device = torch.device(device)
        self.data_summary = dict(data_summary or {})
        torch.manual_seed(config.seed)
        self.model = _build_trainable(config.arch).to(self.device)
        if config.init_checkpoint:
            self._initialise_from(config.init_checkpoint)
        # On the CPU the network trains on channels-last (NDHWC) tensors: oneDNN's 3-D
        # convolutions and their gradients run faster on that layout (a width-8 step of
        # the curriculum's last stage in 0.56x the time); the arithmetic is the same to
        # float rounding. A memory layout, not part of the recipe.
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        self.state = TrainState()
        self._stop_reason: str | None = None

    def _initialise_from(self, path: str) -> None:
        """Starts from the weights of another checkpoint of the same architecture."""
        source = load_checkpoint(path)
        if source.config != self.config.arch:
            raise ValueError(
                f"init checkpoint {path} is {source.config.variant} width {source.config.width} "
                f"on {source.config.normalisation} inputs; this run trains "
                f"{self.config.variant} width {self.config.width} on "
                f"{self.config.normalisation} inputs"
            )
        self.model.load_state_dict(source.model.state_dict())

    # ------------------------------------------------------------------ persistence
    def save_state(self) -> Path:
        payload = {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            # CUDA has its own generator; keep it so that a resumed GPU run matches too.
            "cuda_rng": torch.cuda.get_rng_state(self.device)
            if self.device.type == "cuda"
            else None,
            "state": asdict(self.state),
        }
        return atomic_save(payload, self.run_dir / "state.pt")

    def load_state(self, path: str | Path | None = None) -> None:
        path = Path(path) if path else self.run_dir / "state.pt"
        payload = torch.load(path, map_location=self.device, weights_only=False)
        if payload.get("version") != STATE_VERSION:
            raise ValueError(
                f"{path} is a training state of version {payload.get('version')!r}; "
                f"expected {STATE_VERSION}"
            )
        saved = TrainConfig.from_dict(payload["config"])
        if saved != self.config:
            raise ValueError(
                f"{path} was written by a run with another configuration; "
                "resume with that run's run.json, which holds the configuration it started with"
            )
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self._match_optimizer_layout()
        self.sampler.load_state_dict(payload["sampler"])
        torch.set_rng_state(payload["torch_rng"].cpu())  # map_location moved it to the device
        if payload.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(payload["cuda_rng"].cpu(), self.device)
        self.state = TrainState(**payload["state"])

    def _metadata(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "training": {
                "config": self.config.to_dict(),
                "epochs_done": self.state.epoch,
                "steps": self.state.global_step,
                "patches_seen": self.state.patches_seen,
                "train_seconds": round(self.state.seconds, 1),
                "device": str(self.device),
                "data": self.data_summary,
            },
            **(extra or {}),
        }

    def save_model(self, name: str, extra: dict[str, Any] | None = None) -> Path:
        return save_checkpoint(
            self.run_dir / name, self.model, self.config.arch, self._metadata(extra)
        )

    def _log(self, record: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "train.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def _match_optimizer_layout(self) -> None:
        """The optimiser's buffers (momentum) in their parameters' memory layout: a state
        saved by a run in another layout resumes without mixing layouts in every step."""
        for param, state in self.optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    state[key] = torch.empty_like(param).copy_(
                        value
                    )  # param's layout, value's values

    def _to_network(self, patches: np.ndarray) -> torch.Tensor:
        x = to_network(torch.from_numpy(patches).to(self.device))
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x

    # ------------------------------------------------------------------ training
    def train_step(self, active: Sequence[bool]) -> dict[str, float]:
        batch = self.sampler.sample(active)
        self.model.train()
        inputs = [None if b is None else self._to_network(b) for b in batch.images]
        outputs = self.model.forward_train(inputs)
        losses = task_losses(outputs, batch, self.device, self.config.loss)
        total = torch.stack([loss for loss in losses if loss is not None]).sum()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.state.patches_seen += sum(0 if b is None else len(b) for b in batch.images)
        record = {
            f"loss_{name}": float(loss.detach())
            for name, loss in zip(TASK_NAMES, losses, strict=True)
            if loss is not None
        }
        record.update(
            {f"transfer_{n}": t for n, t in zip(TASK_NAMES, batch.transferred, strict=True) if t}
        )
        return record

    def validate(self) -> dict[str, Any]:
        """Dice (WT, TC, ET) on the validation cases with the whole-case pipeline.

        Returns the mean over cases (``dice``), the mean per institution group
        (``groups``), the mean of the group means (``dice_by_group``: every
        institution counts the same, whatever its number of cases) and per-case figures.
        """
        predictor = Predictor(
            [self.model],
            self.device,
            layout=TILINGS[self.config.val_tiling],
            channels_last=self.channels_last,  # the layout the model trains in: no change
            normalisation=self.config.normalisation,
        )
        options = SegmentationOptions(remove_small=False, relabel_edema=False)
        per_case = {}
        for case, reference in self.validation:
            seg = segment_case(case, predictor, options)
            scores = evaluate_case(seg.labels, reference, case.spacing)
            per_case[case.name] = {r: m.dice for r, m in scores.items()}
        self.model.train()
        return summarise_validation(per_case)

    def _request_stop(self, signum: int, _frame: Any) -> None:
        self._stop_reason = signal.Signals(signum).name

    def fit(
        self,
        max_seconds: float | None = None,
        max_steps: int | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> TrainState:
        """Trains until the schedule ends, ``max_steps`` more steps, or ``max_seconds``.

        Args:
            max_seconds: wall-clock budget of this call, or None for none.
            max_steps: step budget of this call, or None for none.
            progress: called with every step's record (losses, epoch, step, lr).

        Returns:
            The training state at the end of the schedule (also saved).

        Raises:
            TrainingInterruptedError: stopped by SIGINT/SIGTERM or a budget; state saved.
        """
        cfg, st = self.config, self.state
        with self._stop_on_signals():
            budget = _Budget(time.monotonic(), max_seconds, max_steps)
            steps_done, last_save = 0, st.global_step
            while st.epoch < cfg.epochs:
                active = cfg.active_tasks(st.epoch)
                lr = self._set_learning_rate(st.epoch)
                while st.step < cfg.steps_per_epoch:
                    self._stop_if_requested(budget, steps_done)
                    self._step_and_record(active, lr, progress)
                    steps_done += 1
                    if st.global_step - last_save >= cfg.checkpoint_every:
                        self.save_state()
                        last_save = st.global_step
                self._end_epoch(active)
        self.save_state()
        return st

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """Within the block, SIGINT and SIGTERM ask for a stop at the next step.

        The previous handlers come back on leaving. Off the main thread no handler can be
        installed, and the block runs without.
        """
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                handlers[sig] = signal.signal(sig, self._request_stop)
        try:
            yield
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _set_learning_rate(self, epoch: int) -> float:
        """Sets the schedule's learning rate for ``epoch`` on the optimiser; returns it."""
        lr = self.config.learning_rate(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _stop_if_requested(self, budget: _Budget, steps_done: int) -> None:
        """Saves the state and stops when a signal arrived or ``budget`` has run out.

        Raises:
            TrainingInterruptedError: with the reason (signal name, or which budget).
        """
        if self._stop_reason is None:
            self._stop_reason = budget.exhausted(steps_done)
        if self._stop_reason is not None:
            self.save_state()
            raise TrainingInterruptedError(self._stop_reason)

    def _step_and_record(
        self,
        active: Sequence[bool],
        lr: float,
        progress: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        """One training step and its bookkeeping: time, counters, progress, the step log."""
        st = self.state
        t0 = time.monotonic()
        record = self.train_step(active)
        st.seconds += time.monotonic() - t0
        st.step += 1
        st.global_step += 1
        record.update(epoch=st.epoch, step=st.global_step, lr=lr)
        if progress is not None:
            progress(record)
        if st.global_step % self.config.log_every == 0:
            self._log(
                {
                    "kind": "step",
                    **record,
                    "patches_seen": st.patches_seen,
                    "seconds": round(st.seconds, 2),
                }
            )

    def _end_epoch(self, active: Sequence[bool]) -> None:
        st = self.state
        record: dict[str, Any] = {
            "kind": "epoch",
            "epoch": st.epoch,
            "step": st.global_step,
            "active": list(active),
        }
        extra: dict[str, Any] = {}
        is_best = False
        last = st.epoch + 1 == self.config.epochs
        if self.validation and ((st.epoch + 1) % self.config.val_every == 0 or last):
            val = self.validate()
            record["validation"] = val
            extra["validation"] = {"epoch": st.epoch, **val}
            # Groups weigh equally, so a well-scored home site cannot hide another's failure.
            score = float(np.mean(list(val["dice_by_group"].values())))
            if score > st.best_score:
                st.best_score, st.best_epoch = score, st.epoch
                is_best = True
        st.history.append(record)
        self._log(record)
        st.epoch += 1
        st.step = 0
        if is_best:  # saved after the count, so that its epochs_done includes this epoch
            self.save_model("best.pt", extra)
        self.save_model("last.pt", extra)
        self.save_state()


REGIONS = ("WT", "TC", "ET")


def summarise_validation(per_case: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Mean Dice per region over cases, per institution group, and over group means."""
    groups: dict[str, list[dict[str, float]]] = {}
    for name, scores in per_case.items():
        groups.setdefault(institution_group(name), []).append(scores)
    by_group = {
        g: {r: float(np.mean([c[r] for c in cases])) for r in REGIONS}
        for g, cases in sorted(groups.items())
    }
    return {
        "dice": {r: float(np.mean([c[r] for c in per_case.values()])) for r in REGIONS},
        "dice_by_group": {r: float(np.mean([g[r] for g in by_group.values()])) for r in REGIONS},
        "groups": by_group,
        "cases": per_case,
    }
