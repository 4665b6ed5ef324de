"""degrpo.py's formulas against a direct, loop-by-loop transcription of THINKLESS.md section 4."""

import math

import pytest
import torch

from degrpo import group_advantages, kl_k3, policy_loss


def official_loss(logp, old_logp, adv, mask, alpha, eps=0.2):
    """loss = alpha * mean_i L_{i,0} + mean_{i,t>=1} L_{i,t}; vanilla (alpha None): mean over all tokens,
    L_{i,t} = -min(rho A_i, clip(rho, 1-eps, 1+eps) A_i), written with Python loops and math."""
    B, T = mask.shape
    L = {}
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                rho = math.exp(logp[i, t].item() - old_logp[i, t].item())
                a = adv[i].item()
                L[i, t] = -min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
    if alpha is None:
        return sum(L.values()) / len(L)
    control = [v for (i, t), v in L.items() if t == 0]
    answer = [v for (i, t), v in L.items() if t >= 1]
    return alpha * sum(control) / len(control) + sum(answer) / len(answer)


def random_case(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    lens[0] = T
    mask = torch.arange(T)[None] < lens[:, None]
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + torch.randn(B, T, generator=g) * 0.3  # ratios both inside and outside the clip range
    adv = torch.randn(B, generator=g)
    return logp, old, adv, mask


@pytest.mark.parametrize("B,T,seed", [(4, 7, 0), (8, 33, 1), (3, 2, 2), (16, 5, 3)])
@pytest.mark.parametrize("alpha", [None, 0.001, 1.0])
def test_policy_loss_matches_official_formula(B, T, seed, alpha):
    logp, old, adv, mask = random_case(B, T, seed)
    loss, clip_frac = policy_loss(logp, old, adv, mask, alpha=alpha)
    assert loss.item() == pytest.approx(official_loss(logp, old, adv, mask, alpha), rel=1e-5, abs=1e-7)
    assert 0 < clip_frac.item() < 1


def test_global_denominators_split_equals_whole():
    """Summing micro-batch losses normalised by the step's counts gives the whole-batch loss."""
    logp, old, adv, mask = random_case(8, 9, 5)
    whole, _ = policy_loss(logp, old, adv, mask, alpha=0.001)
    n_seqs, n_tokens = mask[:, 0].sum().item(), mask[:, 1:].sum().item()
    parts = sum(policy_loss(logp[s], old[s], adv[s], mask[s], alpha=0.001, num_seqs=n_seqs, num_tokens=n_tokens)[0]
                for s in (slice(0, 3), slice(3, 4), slice(4, 8)))
    torch.testing.assert_close(parts, whole)


def test_control_gradient_scales_with_alpha():
    logp, old, adv, mask = random_case(6, 10, 7)
    grads = []
    for alpha in (0.001, 0.01):
        lp = logp.clone().requires_grad_(True)
        policy_loss(lp, old, adv, mask, alpha=alpha)[0].backward()
        grads.append(lp.grad)
    torch.testing.assert_close(grads[1][:, 0], 10 * grads[0][:, 0])  # control column: linear in alpha
    torch.testing.assert_close(grads[1][:, 1:], grads[0][:, 1:])  # answer tokens: untouched


def test_reduces_to_policy_gradient_when_on_policy():
    """ratios 1 and no clipping: grad of the loss = -(1/N) sum_t A_i grad logp (REINFORCE with a baseline)."""
    logp, _, adv, mask = random_case(5, 6, 9)
    lp = logp.clone().requires_grad_(True)
    loss, clip_frac = policy_loss(lp, logp.detach(), adv, mask, alpha=None, clip_eps=1e9)
    loss.backward()
    assert loss.item() == pytest.approx(-(adv[:, None] * mask).sum().item() / mask.sum().item(), rel=1e-6)
    torch.testing.assert_close(lp.grad, -adv[:, None].expand_as(lp) * mask / mask.sum())
    assert clip_frac.item() == 0


def test_per_sample_normalisation():
    logp, old, adv, mask = random_case(4, 8, 11)
    loss, _ = policy_loss(logp, old, adv, mask, alpha=0.0, per_sample=True)
    ratio = torch.exp(logp - old)
    L = -torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None]) * mask
    expected = sum(L[i, 1:].sum() / max(mask[i, 1:].sum(), 1) for i in range(4)) / 4
    torch.testing.assert_close(loss, expected)


def test_group_advantages():
    r = torch.tensor([1.0, -1, 0.5, -1, 1, 1, 1, 1])
    torch.testing.assert_close(group_advantages(r, 4), torch.tensor([1.125, -0.875, 0.625, -0.875, 0, 0, 0, 0]))
    std = group_advantages(r, 4, std_normalize=True)
    torch.testing.assert_close(std[:4], (r[:4] - r[:4].mean()) / (r[:4].std() + 1e-6))
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.ones(6), 4)


def test_kl_k3_nonnegative_and_zero_at_equality():
    a, b = torch.randn(100), torch.randn(100)
    assert (kl_k3(a, b) >= 0).all() and kl_k3(a, a).abs().max() == 0
    # k3 is an unbiased estimate of KL(p||q) with samples from p: check on a small discrete case
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.5, 0.25, 0.25])
    exact = (p * (p / q).log()).sum()
    expected_k3 = (p * kl_k3(p.log(), q.log())).sum()
    torch.testing.assert_close(expected_k3, exact)


def test_shape_errors():
    logp, old, adv, mask = random_case(4, 5, 0)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, adv[:3], mask)
