"""Tests of model/training/trainer.py: the recipe, the curriculum, training steps, resuming.

Networks are width 4 with two patches per task, on hand-made cached cases; torch runs
on one thread so the tests stay quick on a busy machine.
"""

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from model.io.nifti.files import find_label_file
from model.io.nifti.read import load_case, load_labels
from model.io.phantom import write_phantom
from model.labels import CORE_CLASSES, TaskClass
from model.net.checkpoint import load_checkpoint
from model.net.network import MCCascade
from model.training.config import TASK_NAMES, TrainConfig, TrainingInterruptedError
from model.training.data import HALF, PATCH, CachedCase, PatchSampler, TaskBatch
from model.training.splits import split_cases
from model.training.trainer import DICE_REGIONS, Trainer, soft_region_dice, task_losses

ALL = (True, True, True)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**kwargs) -> TrainConfig:
    defaults = {"width": 4, "batch_per_task": 2, "steps_per_epoch": 2, "val_tiling": "wide"}
    return TrainConfig(**{**defaults, **kwargs})


def _hand_case(seed: int = 0) -> CachedCase:
    """A 40 x 40 x 24 brain with a nested tumour, padded like the cache pads it.

    Images are noise plus a per-class offset per modality, so the classes are learnable.
    """
    rng = np.random.default_rng(seed)
    target = np.zeros((40, 40, 24), dtype=np.uint8)
    target[4:36, 4:36, 2:22] = TaskClass.NORMAL
    target[12:28, 12:28, 6:18] = TaskClass.EDEMA
    target[15:25, 15:25, 8:16] = TaskClass.ENHANCING
    target[18:22, 18:22, 10:14] = TaskClass.NCR_NET
    offsets = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [-2, -1, 2, 1], [-1, 0, 1, 2], [-1, 2, 1, 1]])
    images = rng.normal(0.0, 0.5, (4, *target.shape)) + offsets[target].transpose(3, 0, 1, 2)
    images[:, target == TaskClass.BACKGROUND] = 0.0
    pad = [(h, h) for h in HALF]
    target = np.pad(target, pad)
    images = np.pad(images.astype(np.float16), [(0, 0), *pad])
    regions = (
        target != TaskClass.BACKGROUND,
        target >= TaskClass.NCR_NET,
        np.isin(target, (TaskClass.NCR_NET, TaskClass.ENHANCING)),
    )
    centres = tuple(np.argwhere(r).astype(np.int16) for r in regions)
    return CachedCase(f"hand{seed}", images, target, centres)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cases() -> list[CachedCase]:
    return [_hand_case(0), _hand_case(1)]


def _sampler(cases, transfer: bool = True) -> PatchSampler:
    return PatchSampler(cases, batch_per_task=2, transfer=transfer, seed=0)


@pytest.fixture(scope="module")
def validation(tmp_path_factory):
    """One phantom case with its reference labels."""
    root = tmp_path_factory.mktemp("val")
    write_phantom(root, name="val_case", shape=(48, 48, 32), seed=4)
    case = load_case(root / "val_case")
    return [(case, load_labels(find_label_file(root / "val_case"), like=case))]


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters (batch-norm running statistics left out: a head that only
    guides another task still sees its patches in training mode)."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module, prefix: str) -> bool:
    after = dict(model.named_parameters())
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, f"no parameters under {prefix!r}"
    return any(not torch.equal(before[k], after[k]) for k in keys)


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "train.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# --------------------------------------------------------------------------- the recipe
def test_curriculum_activates_tasks_stage_by_stage():
    config = TrainConfig(stage_epochs=(1, 1, 18))
    assert config.epochs == 20
    assert config.active_tasks(0) == (True, False, False)
    assert config.active_tasks(1) == (True, True, False)
    assert all(config.active_tasks(e) == ALL for e in range(2, 20))
    longer = TrainConfig(stage_epochs=(2, 3, 1))
    assert [longer.active_tasks(e) for e in range(6)] == [
        (True, False, False),
        (True, False, False),
        (True, True, False),
        (True, True, False),
        (True, True, False),
        ALL,
    ]


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(curriculum=False),
        TrainConfig(variant="mc_cascade"),
        _config(variant="mc_cascade"),
    ],
)
def test_without_curriculum_every_task_trains_from_epoch_zero(config):
    assert all(config.active_tasks(e) == ALL for e in range(config.epochs))


def test_learning_rate_halves_every_four_epochs():
    config = TrainConfig()
    assert config.lr == 1e-3
    rates = [config.learning_rate(e) for e in range(12)]
    assert rates[:4] == [1e-3] * 4
    assert rates[4:8] == [5e-4] * 4
    assert rates[8:] == [2.5e-4] * 4
    assert TrainConfig(lr=1e-2, lr_halve_every=2).learning_rate(5) == pytest.approx(2.5e-3)


def test_paper_defaults():
    config = TrainConfig()
    assert config.stage_epochs == (1, 1, 18) and config.batch_per_task == 20
    assert (config.momentum, config.weight_decay) == (0.99, 5e-4)
    assert config.curriculum and config.transfer and config.variant == "omnet_cga"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stage_epochs", (1, 1)),
        ("stage_epochs", (1, -1, 1)),
        ("stage_epochs", (0, 0, 0)),
        ("steps_per_epoch", 0),
        ("batch_per_task", 0),
        ("lr_halve_every", 0),
        ("checkpoint_every", 0),
        ("log_every", 0),
        ("val_every", 0),
        ("val_tiling", "slow"),
        ("variant", "unet"),
        ("width", 0),
        ("dropout", 1.0),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("momentum", 1.0),
        ("weight_decay", -1e-4),
        ("loss", "dice"),
    ],
)
def test_bad_config_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_single_mc_net_is_refused():
    with pytest.raises(ValueError, match="mc_cascade"):
        TrainConfig(variant="mc")


def test_config_round_trips_through_json():
    config = _config(stage_epochs=(2, 0, 3), transfer=False, lr=5e-3)
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.stage_epochs == (2, 0, 3)


def test_online_transfer_follows_the_switch_and_never_for_mc_cascade():
    assert TrainConfig().online_transfer
    assert not TrainConfig(transfer=False).online_transfer
    assert not TrainConfig(variant="mc_cascade").online_transfer
    assert TrainConfig(variant="omnet", curriculum=False).online_transfer  # OM-Net^d


# --------------------------------------------------------------------------- steps
def test_training_steps_reduce_every_task_loss(cases, tmp_path):
    trainer = Trainer(_config(lr=3e-2), _sampler(cases), tmp_path)
    batch = trainer.sampler.sample(ALL)
    trainer.sampler.sample = lambda active: batch  # train on one fixed batch
    records = [trainer.train_step(ALL) for _ in range(10)]
    for name in TASK_NAMES:
        losses = [r[f"loss_{name}"] for r in records]
        assert np.isfinite(losses).all()
        assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), (name, losses)


def test_soft_region_dice_scores_the_regions_the_product_reads():
    """A sure, right prediction scores 1; a region neither side holds scores 1; a region
    predicted where the batch has none scores about 0; and a region is the sum of its
    classes, so confusing two classes of one region costs that region nothing."""
    target = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    target[:, 1:3, 1:3, 1:3] = TaskClass.EDEMA
    target[:, 2, 2, 2] = TaskClass.NCR_NET
    sure = 40 * torch.nn.functional.one_hot(target, 5).permute(0, 4, 1, 2, 3).float()
    whole, both = DICE_REGIONS[0], DICE_REGIONS[1]
    assert soft_region_dice(sure, target, both).item() == pytest.approx(1.0, abs=1e-4)
    no_core = target.clone()
    no_core[no_core == TaskClass.NCR_NET] = TaskClass.EDEMA
    absent = 40 * torch.nn.functional.one_hot(no_core, 5).permute(0, 4, 1, 2, 3).float()
    assert soft_region_dice(absent, no_core, (CORE_CLASSES,)).item() == pytest.approx(1.0)
    assert soft_region_dice(sure, no_core, (CORE_CLASSES,)).item() < 1e-3
    swapped = target.clone()
    swapped[target == TaskClass.EDEMA] = TaskClass.ENHANCING
    assert soft_region_dice(sure, swapped, whole).item() == pytest.approx(1.0, abs=1e-4)
    assert soft_region_dice(sure, swapped, both).item() < 0.7


def test_dice_loss_adds_to_the_cross_entropy_and_trains(cases, tmp_path):
    trainer = Trainer(_config(lr=3e-2, loss="cross-entropy+dice"), _sampler(cases), tmp_path)
    batch = trainer.sampler.sample(ALL)
    outputs = trainer.model.forward_train([trainer._to_network(b) for b in batch.images])
    plain = task_losses(outputs, batch, trainer.device)
    with_dice = task_losses(outputs, batch, trainer.device, "cross-entropy+dice")
    for ce, total in zip(plain, with_dice, strict=True):
        assert ce is not None and total is not None
        assert ce.item() < total.item() <= ce.item() + 1
    trainer.sampler.sample = lambda active: batch  # train on one fixed batch
    records = [trainer.train_step(ALL) for _ in range(10)]
    for name in TASK_NAMES:
        losses = [r[f"loss_{name}"] for r in records]
        assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), (name, losses)


def test_runs_that_name_no_loss_trained_with_the_cross_entropy():
    stored = TrainConfig(loss="cross-entropy+dice").to_dict()
    assert TrainConfig.from_dict(stored).loss == "cross-entropy+dice"
    del stored["loss"]
    assert TrainConfig.from_dict(stored).loss == "cross-entropy" == TrainConfig().loss


def test_inactive_tasks_get_no_loss(cases, tmp_path):
    trainer = Trainer(_config(), _sampler(cases), tmp_path)
    record = trainer.train_step((True, False, False))
    assert set(k for k in record if k.startswith("loss_")) == {"loss_coarse"}
    assert trainer.state.patches_seen == 2


def test_transfer_counts_are_reported_only_with_transfer_on(tmp_path):
    target = np.full(PATCH, TaskClass.NCR_NET, dtype=np.uint8)  # one patch, all core
    images = np.random.default_rng(0).normal(size=(4, *PATCH)).astype(np.float16)
    centre = np.array([HALF], dtype=np.int16)
    case = CachedCase("core", images, target, (centre, centre, centre))
    on = Trainer(_config(), _sampler([case], transfer=True), tmp_path / "on")
    record = on.train_step(ALL)
    assert record["transfer_tumour"] == 2 and record["transfer_enhancing"] == 4
    assert on.state.patches_seen == 2 + 4 + 6
    off = Trainer(_config(transfer=False), _sampler([case], transfer=False), tmp_path / "off")
    assert not any(k.startswith("transfer_") for k in off.train_step(ALL))
    assert off.state.patches_seen == 6


def _one_task_batch(sampler: PatchSampler, task: int) -> TaskBatch:
    full = sampler.sample(ALL)
    keep = [k == task for k in range(3)]
    return TaskBatch(
        images=[b if k else None for b, k in zip(full.images, keep, strict=True)],
        targets=[t if k else None for t, k in zip(full.targets, keep, strict=True)],
    )


def test_cga_task2_loss_never_reaches_task1_head(cases, tmp_path):
    trainer = Trainer(_config(), _sampler(cases), tmp_path)
    batch = _one_task_batch(trainer.sampler, 1)
    trainer.sampler.sample = lambda active: batch
    before = _weights(trainer.model)
    trainer.train_step(ALL)
    assert _changed(before, trainer.model, "backbone.")
    assert _changed(before, trainer.model, "tumour.")
    assert not _changed(before, trainer.model, "coarse.")
    assert not _changed(before, trainer.model, "enhancing.")


@pytest.mark.parametrize(("variant", "soft"), [("omnet_cga", True), ("omnet_cga_minus", False)])
def test_cga_minus_variant_drops_the_soft_masks(cases, tmp_path, variant, soft):
    model = Trainer(_config(variant=variant), _sampler(cases), tmp_path).model
    assert model.tumour.soft_masks is soft and model.enhancing.soft_masks is soft


@pytest.mark.parametrize("task", [0, 1, 2])
def test_mc_cascade_trains_each_net_only_on_its_own_task(cases, tmp_path, task):
    trainer = Trainer(_config(variant="mc_cascade"), _sampler(cases), tmp_path)
    assert isinstance(trainer.model, MCCascade)
    batch = _one_task_batch(trainer.sampler, task)
    trainer.sampler.sample = lambda active: batch
    before = _weights(trainer.model)
    record = trainer.train_step(ALL)
    assert set(k for k in record if k.startswith("loss_")) == {f"loss_{TASK_NAMES[task]}"}
    for k in range(3):
        assert _changed(before, trainer.model, f"nets.{k}.") is (k == task)


# --------------------------------------------------------------------------- fit
def test_fit_switches_stages_and_logs_them(cases, tmp_path):
    config = _config(stage_epochs=(1, 1, 1), log_every=1, lr_halve_every=2)
    trainer = Trainer(config, _sampler(cases), tmp_path)
    seen = []
    state = trainer.fit(progress=seen.append)
    assert state.epoch == 3 and state.global_step == 6 and state.step == 0
    epochs = _records(tmp_path, "epoch")
    assert [r["active"] for r in epochs] == [
        [True, False, False],
        [True, True, False],
        [True, True, True],
    ]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    steps = _records(tmp_path, "step")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    expected_losses = [["coarse"]] * 2 + [["coarse", "tumour"]] * 2 + [list(TASK_NAMES)] * 2
    for record, names in zip(steps, expected_losses, strict=True):
        assert sorted(k[5:] for k in record if k.startswith("loss_")) == sorted(names)
    assert [r["lr"] for r in steps] == [1e-3] * 4 + [5e-4] * 2
    assert [r["step"] for r in seen] == [1, 2, 3, 4, 5, 6]
    assert trainer.optimizer.param_groups[0]["lr"] == 5e-4
    assert (tmp_path / "state.pt").is_file() and (tmp_path / "last.pt").is_file()
    assert not (tmp_path / "best.pt").exists()  # nothing to validate on


def _fit_steps(trainer: Trainer, steps: int) -> None:
    with pytest.raises(TrainingInterruptedError, match="step budget"):
        trainer.fit(max_steps=steps)


def test_resume_continues_exactly_where_it_stopped(cases, tmp_path):
    config = _config(stage_epochs=(1, 1, 1))  # 6 steps; dropout 0.5 draws random masks
    straight = Trainer(config, _sampler(cases), tmp_path / "straight")
    straight.fit()

    first = Trainer(config, _sampler(cases), tmp_path / "split")
    _fit_steps(first, 3)  # stops in the middle of the second stage
    first.save_state()
    torch.rand(100)  # whatever happens in between must not matter
    np.random.default_rng(1).random(5)
    second = Trainer(config, _sampler(cases), tmp_path / "split")
    second.load_state()
    assert second.state.global_step == 3 and second.state.epoch == 1
    second.fit()

    assert second.state.global_step == straight.state.global_step == 6
    a, b = straight.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    params_a = dict(straight.model.named_parameters())
    params_b = dict(second.model.named_parameters())
    for name, p in params_a.items():
        momentum_a = straight.optimizer.state[p]["momentum_buffer"]
        assert torch.equal(momentum_a, second.optimizer.state[params_b[name]]["momentum_buffer"])
    assert straight.sampler.state_dict() == second.sampler.state_dict()
    # The weights did move, so equality above is not trivial.
    fresh = Trainer(config, _sampler(cases), tmp_path / "fresh").model.state_dict()
    assert not all(torch.equal(fresh[k], a[k]) for k in a)


def test_cpu_training_runs_channels_last_and_resumes_a_plain_layout_state(cases, tmp_path):
    """The layout is speed only: a state saved in the plain layout resumes with its
    momentum buffers laid out like their parameters, and training goes on from it."""
    config = _config(stage_epochs=(1, 1, 1))
    plain = Trainer(config, _sampler(cases), tmp_path / "run")
    assert plain.channels_last
    weights = [p for p in plain.model.parameters() if p.ndim == 5]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in weights)
    # A state written by a run whose tensors were in the plain layout.
    plain.channels_last = False
    plain.model.to(memory_format=torch.contiguous_format)
    _fit_steps(plain, 2)
    plain.save_state()
    resumed = Trainer(config, _sampler(cases), tmp_path / "run")
    resumed.load_state()
    checked = 0
    for name, param in resumed.model.named_parameters():
        if "momentum_buffer" not in resumed.optimizer.state[param]:
            continue  # a task not trained yet
        checked += 1
        buffer = resumed.optimizer.state[param]["momentum_buffer"]
        assert buffer.stride() == param.stride(), name
        saved = plain.optimizer.state[dict(plain.model.named_parameters())[name]]
        assert torch.equal(buffer, saved["momentum_buffer"]), name
    assert checked > 0
    resumed.fit()
    assert resumed.state.global_step == 6


def test_resume_refuses_another_configuration(cases, tmp_path):
    trainer = Trainer(_config(), _sampler(cases), tmp_path)
    trainer.save_state()
    other = Trainer(_config(lr=2e-3), _sampler(cases), tmp_path)
    with pytest.raises(ValueError, match="configuration") as refused:
        other.load_state()
    assert "run.json" in str(refused.value)  # the file the command line writes to a run
    assert "config.json" not in str(refused.value)


def test_module_doc_names_the_run_file():
    from model.training import trainer as training

    assert "``run.json``" in (training.__doc__ or "")
    assert "config.json" not in (training.__doc__ or "")


def test_validate_reports_dice_per_region(cases, validation, tmp_path):
    trainer = Trainer(_config(), _sampler(cases), tmp_path, validation)
    result = trainer.validate()
    assert set(result["dice"]) == {"WT", "TC", "ET"}
    assert all(0.0 <= d <= 1.0 for d in result["dice"].values())
    assert set(result["cases"]) == {"val_case"}
    assert result["cases"]["val_case"] == result["dice"]  # one case: the mean is that case
    assert trainer.model.training  # back in training mode


def test_checkpoints_carry_the_training_metadata(cases, validation, tmp_path):
    config = _config(stage_epochs=(1, 0, 1), steps_per_epoch=1)
    trainer = Trainer(config, _sampler(cases), tmp_path, validation, data_summary={"n": 2})
    state = trainer.fit()
    assert 0 <= state.best_epoch <= 1 and np.isfinite(state.best_score)

    last = load_checkpoint(tmp_path / "last.pt")
    assert last.config == config.arch
    training = last.metadata["training"]
    assert training["config"] == config.to_dict()
    assert (training["epochs_done"], training["steps"]) == (2, 2)
    assert training["data"] == {"n": 2} and training["device"] == "cpu"
    assert last.metadata["validation"]["epoch"] == 1
    model = trainer.model.state_dict()
    for key, value in last.model.state_dict().items():
        assert torch.equal(value, model[key]), key

    best = load_checkpoint(tmp_path / "best.pt")
    assert best.metadata["training"]["config"] == config.to_dict()
    assert best.metadata["training"]["epochs_done"] == state.best_epoch + 1
    assert best.metadata["training"]["steps"] == state.best_epoch + 1  # one step an epoch
    assert best.metadata["validation"]["epoch"] == state.best_epoch
    dice = best.metadata["validation"]["dice"]
    assert np.mean(list(dice.values())) == pytest.approx(state.best_score)
    validations = [r["validation"]["dice"] for r in _records(tmp_path, "epoch")]
    assert len(validations) == 2 and dice in validations


def test_sigint_stops_after_saving_and_the_run_resumes(cases, tmp_path):
    config = _config(steps_per_epoch=3, stage_epochs=(1, 0, 1))
    trainer = Trainer(config, _sampler(cases), tmp_path)
    handler = signal.getsignal(signal.SIGINT)

    def progress(record):
        if record["step"] == 2:
            trainer._request_stop(signal.SIGINT, None)

    with pytest.raises(TrainingInterruptedError, match="SIGINT"):
        trainer.fit(progress=progress)
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler is back
    saved = torch.load(tmp_path / "state.pt", weights_only=False)
    assert saved["state"]["global_step"] == 2 and saved["state"]["step"] == 2
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(saved["model"][key], value), key

    resumed = Trainer(config, _sampler(cases), tmp_path)
    resumed.load_state()
    assert resumed.fit().global_step == 6


def test_time_budget_stops_before_any_step(cases, tmp_path):
    trainer = Trainer(_config(), _sampler(cases), tmp_path)
    with pytest.raises(TrainingInterruptedError, match="time budget"):
        trainer.fit(max_seconds=0)
    assert trainer.state.global_step == 0 and (tmp_path / "state.pt").is_file()


# --------------------------------------------------------------------------- splits
def _dirs(names) -> list[Path]:
    return [Path("/data") / n for n in names]


def test_split_by_hash_is_fixed_and_disjoint():
    names = [f"case{i}" for i in range(10)]
    train, val = split_cases(_dirs(names))
    assert len(val) == 2 and len(train) == 8
    assert not {p.name for p in train} & {p.name for p in val}
    assert split_cases(_dirs(reversed(names))) == (train, val)


def test_split_by_names():
    train, val = split_cases(_dirs(["a", "b", "c"]), val_names=["b"])
    assert [p.name for p in train] == ["a", "c"] and [p.name for p in val] == ["b"]
    with pytest.raises(ValueError, match="not in the data folder"):
        split_cases(_dirs(["a", "b"]), val_names=["z"])
    with pytest.raises(ValueError, match="both"):
        split_cases(_dirs(["a", "b"]), val_names=["a"], train_names=["a", "b"])


def test_a_run_can_start_from_another_checkpoint(tmp_path, cases):
    from model.net.checkpoint import save_checkpoint
    from model.net.network import ArchConfig, build_model

    torch.manual_seed(7)
    source = build_model(ArchConfig(width=4))
    path = save_checkpoint(tmp_path / "init.pt", source, ArchConfig(width=4))
    config = TrainConfig(width=4, init_checkpoint=str(path))
    trainer = Trainer(config, _sampler(cases), tmp_path / "run")
    for key, value in source.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[key], value), key
    with pytest.raises(ValueError, match="width"):
        Trainer(TrainConfig(width=8, init_checkpoint=str(path)), _sampler(cases), tmp_path / "r2")
