"""The network's arithmetic at inference: which precision ``auto`` resolves to, and that
the product's path reports what it used."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.defaults import PRECISIONS
from model.inference import tiling
from model.inference.pipeline import load_predictor, segment_images
from model.inference.report import upgrade_report
from model.inference.tiling import Predictor, native_half_precision, resolve_precision
from model.net.checkpoint import save_checkpoint
from model.net.network import ArchConfig, build_model


def test_auto_autocasts_where_the_cpu_has_native_bfloat16(monkeypatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not native_half_precision(cpu)
    assert resolve_precision("auto", cpu) is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert native_half_precision(cpu) and resolve_precision("auto", cpu) is True
    assert native_half_precision(torch.device("cuda"))
    assert resolve_precision("float32", torch.device("cuda")) is False
    assert resolve_precision("mixed", cpu) is True
    assert set(PRECISIONS) == {"auto", "float32", "mixed"}
    with pytest.raises(ValueError, match="precision must be one of auto, float32, mixed"):
        resolve_precision("half", cpu)


def test_a_predictor_names_its_arithmetic() -> None:
    model = build_model(ArchConfig(width=2))
    assert Predictor([model], "cpu").precision == "float32"
    assert Predictor([model], "cpu", mixed_precision=True).precision == "bfloat16"


@pytest.mark.parametrize("precision", ["float32", "mixed"])
def test_bfloat16_gives_the_float32_labels_on_a_phantom(tmp_path, precision) -> None:
    """The whole-case path under both arithmetics: bfloat16 rounds the probabilities,
    and the labels of a random network's phantom case barely move."""
    torch.manual_seed(0)
    config = ArchConfig(width=4)
    path = save_checkpoint(tmp_path / "m.pt", build_model(config), config)
    rng = np.random.default_rng(0)
    images = np.zeros((4, 32, 32, 24), dtype=np.float32)
    images[:, 4:28, 4:28, 2:22] = rng.normal(100, 20, (4, 24, 24, 20))
    reference, _ = load_predictor([path], "cpu", precision="float32")
    predictor, _ = load_predictor([path], "cpu", precision=precision)
    assert predictor.precision == ("float32" if precision == "float32" else "bfloat16")
    want = segment_images(images, np.eye(4), reference).labels
    got = segment_images(images, np.eye(4), predictor).labels
    assert (got == want).mean() > 0.99


def test_the_auto_precision_follows_the_machine(tmp_path, monkeypatch) -> None:
    config = ArchConfig(width=2)
    path = save_checkpoint(tmp_path / "m.pt", build_model(config), config)
    monkeypatch.setattr(tiling, "native_half_precision", lambda device: False)
    assert load_predictor([path], "cpu")[0].precision == "float32"
    monkeypatch.setattr(tiling, "native_half_precision", lambda device: True)
    assert load_predictor([path], "cpu")[0].precision == "bfloat16"


def test_a_version_1_report_stored_before_precision_gains_it() -> None:
    old = {"report_version": 1, "inference": {"device": "cpu", "tiling": "wide"}}
    assert upgrade_report(old)["inference"]["precision"] == "float32"
    cuda = {"report_version": 1, "inference": {"device": "cuda:0"}}
    assert upgrade_report(cuda)["inference"]["precision"] == "float16"
    assert upgrade_report({"report_version": 1, "inference": None})["inference"] is None


def test_a_version_1_report_stored_before_tta_modes_gains_its_mode() -> None:
    for tta, mode in ((True, "all"), (False, "off")):
        old = {"report_version": 1, "inference": {"device": "cpu", "tta": tta}}
        assert upgrade_report(old)["inference"]["tta_mode"] == mode
    now = {"report_version": 1, "inference": {"tta": True, "tta_mode": "mirror"}}
    assert upgrade_report(now)["inference"]["tta_mode"] == "mirror"


def test_a_report_stored_before_the_fusion_rule_was_recorded_says_argmax() -> None:
    old = {"report_version": 1, "inference": {"tta": True, "tta_mode": "mirror"}}
    assert upgrade_report(old)["inference"]["fusion"] == "argmax"
    now = {"report_version": 1, "inference": {"fusion": "joint"}}
    assert upgrade_report(now)["inference"]["fusion"] == "joint"
