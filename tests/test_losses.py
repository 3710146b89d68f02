"""reverse_kl_pg against a float64 reference written like the formula, values and gradients."""

import torch

from learner.losses import masked_mean, reverse_kl_pg


def reference(s, b, q, m, cap):
    """-(1/sum m) * sum_t m_t * min(exp(s_t - b_t), C) * (q_t - b_t) * s_t, weight and advantage held fixed."""
    total, count = 0.0, 0.0
    for i in range(s.shape[0]):
        for t in range(s.shape[1]):
            if m[i, t]:
                w = min(float(torch.exp(s[i, t].detach() - b[i, t])), cap)
                total = total - w * float(q[i, t] - b[i, t]) * s[i, t]
                count += 1
    return total / max(count, 1)


def _inputs(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    s = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    b = s.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    q = -torch.rand(B, T, generator=g, dtype=torch.float64) * 5
    m = (torch.rand(B, T, generator=g) > 0.3).double()
    return s, b, q, m


def test_value_and_gradient_match_reference():
    for seed in range(5):
        s, b, q, m = _inputs(seed)
        out = reverse_kl_pg(s, b, q, m, is_cap=1.5)
        (g,) = torch.autograd.grad(out.loss, s)
        s2 = s.detach().clone().requires_grad_()
        ref = reference(s2, b, q, m, 1.5)
        (g_ref,) = torch.autograd.grad(ref, s2)
        torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-12)


def test_identical_policies_give_zero_kl_and_zero_advantage():
    s, _, _, m = _inputs(1)
    out = reverse_kl_pg(s, s.detach(), s.detach(), m, is_cap=2.0)
    assert float(out.reverse_kl) == 0.0 and float(out.loss.detach()) == 0.0
    assert float(out.importance_weight) == 1.0 and float(out.clip_fraction) == 0.0


def test_on_policy_gradient_is_the_plain_policy_gradient():
    s, _, q, m = _inputs(2)
    b = s.detach()
    (g,) = torch.autograd.grad(reverse_kl_pg(s, b, q, m, is_cap=2.0).loss, s)
    expected = -(q - b) * m / m.sum()
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-12)


def test_cap_truncates_and_is_counted():
    s = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[-3.0, 0.0]], dtype=torch.float64)  # ratio e^3 > C on the first token
    out = reverse_kl_pg(s, b, torch.full_like(b, -1.0), torch.ones_like(b), is_cap=2.0)
    assert float(out.clip_fraction) == 0.5
    torch.testing.assert_close(out.importance_weight, torch.tensor(1.5, dtype=torch.float64))


def test_empty_mask_gives_zero_not_nan():
    s, b, q, _ = _inputs(3)
    out = reverse_kl_pg(s, b, q, torch.zeros_like(b), is_cap=2.0)
    assert torch.isfinite(out.loss) and float(out.loss.detach()) == 0.0
    assert float(masked_mean(b, torch.zeros_like(b))) == 0.0
