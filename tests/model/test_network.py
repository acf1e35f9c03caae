import pytest
import torch

from model.net.network import (
    VARIANTS,
    ArchConfig,
    OMNet,
    TaskOutputs,
    build_model,
    count_flops,
    count_parameters,
)

PAPER_PARAMS = {"mc": 13.813e6, "omnet": 13.869e6, "omnet_se": 13.870e6, "omnet_cga": 13.814e6}


@pytest.fixture(scope="module")
def paper_counts():
    return {v: count_parameters(build_model(ArchConfig(variant=v))) for v in PAPER_PARAMS}


@pytest.mark.parametrize("variant", sorted(PAPER_PARAMS))
def test_parameter_count_within_a_tenth_percent_of_table_one(paper_counts, variant):
    paper = PAPER_PARAMS[variant]
    assert abs(paper_counts[variant] - paper) / paper < 1e-3, paper_counts[variant]


def test_cga_is_smaller_than_omnet(paper_counts):
    assert paper_counts["omnet_cga"] < paper_counts["omnet"]
    assert paper_counts["omnet_se"] > paper_counts["omnet"]


def _tiny(variant, **kw):
    torch.manual_seed(0)
    return build_model(ArchConfig(variant=variant, width=4, **kw))


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "mc"])
def test_inference_returns_three_named_outputs(variant):
    model = _tiny(variant).eval()
    out = model(torch.randn(2, 4, 16, 32, 32))
    assert isinstance(out, TaskOutputs)
    assert out.coarse.shape == (2, 5, 16, 32, 32)
    assert out.tumour.shape == (2, 5, 16, 32, 32)
    assert out.enhancing.shape == (2, 2, 16, 32, 32)


def test_single_task_net_has_its_classes():
    model = _tiny("mc", num_classes=2).eval()
    assert model(torch.randn(1, 4, 16, 32, 32)).shape == (1, 2, 16, 32, 32)


@pytest.mark.parametrize(
    "variant", ["omnet", "omnet_se", "omnet_cga", "omnet_cga_minus", "mc_cascade"]
)
def test_training_slices_equal_each_task_alone(variant):
    model = _tiny(variant).double().eval()  # eval: batch norm uses running statistics
    torch.manual_seed(1)
    b1, b2, b3 = (torch.randn(n, 4, 16, 32, 32, dtype=torch.float64) for n in (3, 2, 1))
    with torch.no_grad():
        joint = model.forward_train([b1, b2, b3])
        torch.testing.assert_close(joint.coarse, model(b1).coarse, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(joint.tumour, model(b2).tumour, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(joint.enhancing, model(b3).enhancing, rtol=1e-9, atol=1e-9)
        partial = model.forward_train([b1, None, None])
    assert partial.tumour is None and partial.enhancing is None
    assert partial.coarse.shape[0] == 3


def _loss(scores):
    return scores.float().pow(2).mean()


@pytest.mark.parametrize("variant", ["omnet_cga", "omnet_cga_minus"])
def test_task2_loss_leaves_task1_classifier_untouched(variant):
    model = _tiny(variant).train()
    out = model.forward_train([None, torch.randn(2, 4, 16, 32, 32), None])
    _loss(out.tumour).backward()
    for p in model.coarse.parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    # ... while the shared backbone and task 2's own module do learn from it.
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.tumour.parameters())


@pytest.mark.parametrize("variant", ["omnet_cga", "omnet_cga_minus"])
def test_task3_loss_leaves_task2_cga_untouched(variant):
    model = _tiny(variant).train()
    out = model.forward_train([None, None, torch.randn(2, 4, 16, 32, 32)])
    _loss(out.enhancing).backward()
    for p in list(model.tumour.parameters()) + list(model.coarse.parameters()):
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.enhancing.parameters())


def test_inference_guidance_uses_preceding_task_on_same_patch():
    """Changing task 1's classifier changes task 2's output under CGA, not under plain OM-Net."""
    x = torch.randn(1, 4, 16, 32, 32)
    for variant, should_change in (("omnet_cga", True), ("omnet", False)):
        model = _tiny(variant).eval()
        with torch.no_grad():
            before = model(x).tumour.clone()
            model.coarse.classifier.weight.add_(torch.randn_like(model.coarse.classifier.weight))
            after = model(x).tumour
        assert (not torch.allclose(before, after)) == should_change, variant


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"variant": "unet"}, "variant"),
        ({"width": 0}, "width"),
        ({"width": -8}, "width"),
        ({"in_channels": 3}, "in_channels"),
        ({"dropout": 1.5}, "dropout"),
    ],
)
def test_bad_construction_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ArchConfig(**kwargs)


def test_bad_input_shape_is_rejected():
    model = _tiny("omnet").eval()
    with pytest.raises(ValueError, match="multiple of 8"):
        model(torch.randn(1, 4, 15, 32, 32))
    with pytest.raises(ValueError, match="input must be"):
        model(torch.randn(1, 3, 16, 32, 32))
    with pytest.raises(ValueError, match="at least one"):
        model.forward_train([None, None, None])


def test_flops_grow_with_width():
    small, large = count_flops(_tiny("omnet_cga")), count_flops(build_model(ArchConfig(width=8)))
    assert 0 < small < large


def test_omnet_rejects_mc_variant():
    with pytest.raises(ValueError, match="variant"):
        OMNet(ArchConfig(variant="mc"))
