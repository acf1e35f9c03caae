import numpy as np
import pytest
import torch

from model.labels import CORE_CLASSES, TUMOUR_CLASSES
from model.net.cga import CrossTaskGuidedAttention, category_probabilities


def _numpy_cga(features, probs, target, w_t, b_t, w_n, b_n, w_s, b_s, soft=True):
    """Equations 3-9 for one sample, written independently with NumPy (float64)."""
    c, *spatial = features.shape
    f = features.reshape(c, -1)  # (C, V)
    p = probs.reshape(probs.shape[0], -1)
    p_t = p[list(target)].sum(axis=0)  # eq. 3
    p_n = np.delete(p, list(target), axis=0).sum(axis=0)  # eq. 4
    m_t = (f * p_t).sum(axis=1)  # eq. 5
    m_n = (f * p_n).sum(axis=1)
    m_t = m_t / np.abs(m_t).sum()  # eq. 6
    m_n = m_n / np.abs(m_n).sum()
    u_t = m_t[:, None] * f  # eq. 7
    u_n = m_n[:, None] * f
    s_t = w_t @ u_t + b_t[:, None]  # eq. 8
    s_n = w_n @ u_n + b_n[:, None]
    s_tilde = p_t * s_t + p_n * s_n if soft else s_t + s_n  # eq. 9
    s = w_s @ s_tilde + b_s[:, None]
    return s.reshape(-1, *spatial)


@pytest.mark.parametrize("soft", [True, False])
@pytest.mark.parametrize(("classes", "target"), [(5, TUMOUR_CLASSES), (2, CORE_CLASSES)])
def test_cga_matches_numpy_equations(soft, classes, target):
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    channels = 6
    module = CrossTaskGuidedAttention(channels, classes, target, soft_masks=soft).double()
    features = rng.normal(size=(2, channels, 4, 5, 3))
    logits = rng.normal(size=(2, 5, 4, 5, 3))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    with torch.no_grad():
        out = module(torch.from_numpy(features), torch.from_numpy(probs)).numpy()
    params = [
        p.detach().numpy().reshape(p.shape[0], -1) if p.ndim > 1 else p.detach().numpy()
        for p in (
            module.target_scores.weight,
            module.target_scores.bias,
            module.non_target_scores.weight,
            module.non_target_scores.bias,
            module.fuse.weight,
            module.fuse.bias,
        )
    ]
    for b in range(2):
        expected = _numpy_cga(features[b], probs[b], target, *params, soft=soft)
        np.testing.assert_allclose(out[b], expected, rtol=1e-10, atol=1e-10)


def test_cga_minus_is_plain_sum_independent_of_spatial_masks():
    """Without soft masks, P only enters through m_t and m_n."""
    torch.manual_seed(0)
    module = CrossTaskGuidedAttention(4, 2, CORE_CLASSES, soft_masks=False).double()
    f = torch.rand(1, 4, 2, 2, 2, dtype=torch.float64)
    p = torch.softmax(torch.randn(1, 5, 2, 2, 2, dtype=torch.float64), dim=1)
    with torch.no_grad():
        out = module(f, p)
        m_t = (f * category_probabilities(p, CORE_CLASSES)[0]).sum(dim=(2, 3, 4), keepdim=True)
        m_n = (f * category_probabilities(p, CORE_CLASSES)[1]).sum(dim=(2, 3, 4), keepdim=True)
        s_t = module.target_scores(f * m_t / m_t.abs().sum())
        s_n = module.non_target_scores(f * m_n / m_n.abs().sum())
        expected = module.fuse(s_t + s_n)
    torch.testing.assert_close(out, expected)


def test_category_probabilities_sum_to_one():
    p = torch.softmax(torch.randn(3, 5, 2, 3, 4), dim=1)
    p_t, p_n = category_probabilities(p, TUMOUR_CLASSES)
    torch.testing.assert_close(p_t + p_n, torch.ones_like(p_t))
    torch.testing.assert_close(p_t, p[:, 2:5].sum(dim=1, keepdim=True))
