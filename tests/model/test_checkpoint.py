import hashlib

import pytest
import torch

from model.net.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint_info,
    save_checkpoint,
)
from model.net.network import ArchConfig, build_model


@pytest.mark.parametrize("variant", ["omnet_cga", "omnet_se", "mc_cascade"])
def test_round_trip_reproduces_outputs_bit_for_bit(tmp_path, variant):
    torch.manual_seed(0)
    config = ArchConfig(variant=variant, width=4)
    model = build_model(config)
    model.train()
    model.forward_train([torch.randn(2, 4, 16, 32, 32), None, None])  # move BN statistics
    model.eval()
    x = torch.randn(2, 4, 16, 32, 32)
    with torch.no_grad():
        expected = model(x)
    path = save_checkpoint(tmp_path / "m.pt", model, config, {"epochs": 3})
    ckpt = load_checkpoint(path)
    assert ckpt.config == config
    assert ckpt.metadata == {"epochs": 3}
    assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert read_checkpoint_info(path).sha256 == ckpt.sha256
    with torch.no_grad():
        got = ckpt.model(x)
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


def test_half_precision_checkpoint_loads_as_float32(tmp_path):
    torch.manual_seed(0)
    config = ArchConfig(width=4)
    model = build_model(config).eval()
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "h.pt", model, config, half=True))
    assert all(p.dtype == torch.float32 for p in ckpt.model.parameters())
    x = torch.randn(1, 4, 16, 32, 32)
    with torch.no_grad():
        got, want = ckpt.model(x).coarse, model(x).coarse
    # Float16 weights move logits of size ~20 by a few hundredths; what inference uses,
    # the probabilities, stay within 0.02 (seen: under 0.01 for several seeds).
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()
    torch.testing.assert_close(got.softmax(1), want.softmax(1), rtol=0, atol=2e-2)


def test_incompatible_format_version_fails_clearly(tmp_path):
    config = ArchConfig(width=4)
    path = save_checkpoint(tmp_path / "m.pt", build_model(config), config)
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(bad)
    torch.save({"weights": 1}, bad)
    with pytest.raises(CheckpointError, match="not an omnet checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_description_leaves_out_machine_paths(tmp_path):
    from model.net.checkpoint import describe_checkpoints

    config = ArchConfig(width=4)
    metadata = {
        "training": {"init_checkpoint": "/srv/omnet/runs/a/best.pt", "folders": ["/data/x"]},
        "windows": "C:\\models\\m.pt",
        "note": "trained on 17 cases / 5 held out",
    }
    path = save_checkpoint(tmp_path / "m.pt", build_model(config), config, metadata)
    described = describe_checkpoints([load_checkpoint(path)])
    meta = described["checkpoints"][0]["metadata"]
    assert meta["training"] == {"init_checkpoint": "best.pt", "folders": ["x"]}
    assert meta["windows"] == "m.pt" and meta["note"] == metadata["note"]
    assert str(tmp_path) not in repr(described)
