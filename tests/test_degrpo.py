"""degrpo.py's formulas against a direct, loop-by-loop transcription of THINKLESS.md section 4."""

import math

import pytest
import torch

from degrpo import group_advantages, kl_k3, policy_loss


def official_loss(logp, old_logp, adv, mask, alpha, eps=0.2, loss_agg=None):
    """THINKLESS.md section 4 written with Python loops and math, L_{i,t} = -min(rho A_i, clip(rho, 1-eps, 1+eps) A_i):
      vanilla (alpha None), seq-mean:   (1/n) sum_i 1/(T_i+1) sum_{t=0..T_i} L_{i,t}   (the paper's)
      vanilla, token-mean:              mean over all tokens                            (the official code's)
      DeGRPO: alpha * mean_i L_{i,0} + answer term, the answer term token-mean (mean over all tokens t >= 1,
              the official code's) or seq-mean ((1/n) sum_i (1/T_i) sum_{t>=1} L_{i,t}, the paper's)."""
    loss_agg = loss_agg or ("seq-mean" if alpha is None else "token-mean")
    B, T = mask.shape
    L = {}
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                rho = math.exp(logp[i, t].item() - old_logp[i, t].item())
                a = adv[i].item()
                L[i, t] = -min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)

    def mean(xs):
        return sum(xs) / len(xs) if xs else 0.0

    first = 0 if alpha is None else 1  # vanilla: the control token is one more response token
    tokens = {i: [v for (j, t), v in L.items() if j == i and t >= first] for i in range(B)}
    if loss_agg == "seq-mean":
        term = mean([mean(tokens[i]) for i in range(B)])
    else:
        term = mean([v for i in range(B) for v in tokens[i]])
    if alpha is None:
        return term
    return alpha * mean([L[i, 0] for i in range(B)]) + term


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
@pytest.mark.parametrize("loss_agg", [None, "seq-mean", "token-mean"])
def test_policy_loss_matches_official_formula(B, T, seed, alpha, loss_agg):
    logp, old, adv, mask = random_case(B, T, seed)
    loss, clip_frac = policy_loss(logp, old, adv, mask, alpha=alpha, loss_agg=loss_agg)
    assert loss.item() == pytest.approx(official_loss(logp, old, adv, mask, alpha, loss_agg=loss_agg), rel=1e-5, abs=1e-7)
    assert 0 < clip_frac.item() < 1


def test_default_aggregation_is_the_papers_for_vanilla_and_the_official_codes_for_degrpo():
    logp, old, adv, mask = random_case(8, 9, 4)
    for alpha, default in ((None, "seq-mean"), (0.01, "token-mean")):
        assert policy_loss(logp, old, adv, mask, alpha=alpha)[0] == policy_loss(logp, old, adv, mask, alpha=alpha,
                                                                                loss_agg=default)[0]
    assert policy_loss(logp, old, adv, mask, alpha=None, loss_agg="token-mean")[0] != policy_loss(
        logp, old, adv, mask, alpha=None, loss_agg="seq-mean")[0]  # lengths differ: the two are not the same
    with pytest.raises(ValueError, match="loss_agg"):
        policy_loss(logp, old, adv, mask, alpha=0.001, loss_agg="sample-mean")


def test_copier_traps_are_refused():
    """alpha has no default (a call without it is not silently DeGRPO at 0.001), a count of 0 is refused
    rather than read as "not given", and an empty loss_agg is not taken for the default."""
    logp, old, adv, mask = random_case(4, 6, 5)
    with pytest.raises(TypeError, match="alpha"):
        policy_loss(logp, old, adv, mask)
    for bad in (dict(num_seqs=0), dict(num_tokens=0), dict(num_seqs=-2.0)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}=.*expected a positive count"):
            policy_loss(logp, old, adv, mask, alpha=0.001, **bad)
    with pytest.raises(ValueError, match="loss_agg=''"):
        policy_loss(logp, old, adv, mask, alpha=None, loss_agg="")


@pytest.mark.parametrize("alpha", [None, 0.001])
@pytest.mark.parametrize("loss_agg", ["seq-mean", "token-mean"])
def test_global_denominators_split_equals_whole(alpha, loss_agg):
    """Summing micro-batch losses normalised by the step's counts gives the whole-batch loss: the
    per-response 1/T_i of seq-mean is local to a row, its 1/n is the step's number of responses."""
    logp, old, adv, mask = random_case(8, 9, 5)
    whole, _ = policy_loss(logp, old, adv, mask, alpha=alpha, loss_agg=loss_agg)
    n_seqs = mask[:, 0].sum().item()
    n_tokens = mask.sum().item() if alpha is None else mask[:, 1:].sum().item()
    parts = sum(policy_loss(logp[s], old[s], adv[s], mask[s], alpha=alpha, num_seqs=n_seqs, num_tokens=n_tokens,
                            loss_agg=loss_agg)[0] for s in (slice(0, 3), slice(3, 4), slice(4, 8)))
    torch.testing.assert_close(parts, whole)


@pytest.mark.parametrize("loss_agg", ["seq-mean", "token-mean"])
def test_vanilla_token_weights_on_policy(loss_agg):
    """On-policy (rho = 1, no clipping) vanilla GRPO is REINFORCE with a baseline: the gradient ascends
    A_i x w_i x grad log p of every token of response i, control token c_i included, with
    w_i = 1/(n (T_i+1)) under seq-mean (a long response moves the mode choice less) and 1/N under
    token-mean (the same for every response)."""
    logp, _, adv, mask = random_case(6, 12, 8)
    lengths = mask.sum(1)  # T_i + 1 tokens per response
    assert len(set(lengths.tolist())) > 2
    lp = logp.clone().requires_grad_(True)
    loss, clip_frac = policy_loss(lp, logp.detach(), adv, mask, alpha=None, clip_eps=1e9, loss_agg=loss_agg)
    loss.backward()
    n, N = len(adv), mask.sum()
    w = 1 / (n * lengths) if loss_agg == "seq-mean" else torch.full((n,), 1 / N.item())
    torch.testing.assert_close(-lp.grad[:, 0], adv * w)  # the control token: A_i / (n (T_i+1)) or A_i / N
    torch.testing.assert_close(-lp.grad, (adv * w)[:, None] * mask)
    assert loss.item() == pytest.approx(-(adv * w * lengths).sum().item(), rel=1e-6)
    assert clip_frac.item() == 0


def test_control_gradient_scales_with_alpha():
    logp, old, adv, mask = random_case(6, 10, 7)
    grads = []
    for alpha in (0.001, 0.01):
        lp = logp.clone().requires_grad_(True)
        policy_loss(lp, old, adv, mask, alpha=alpha)[0].backward()
        grads.append(lp.grad)
    torch.testing.assert_close(grads[1][:, 0], 10 * grads[0][:, 0])  # control column: linear in alpha
    torch.testing.assert_close(grads[1][:, 1:], grads[0][:, 1:])  # answer tokens: untouched


def test_group_advantages():
    r = torch.tensor([1.0, -1, 0.5, -1, 1, 1, 1, 1])
    torch.testing.assert_close(group_advantages(r, 4), torch.tensor([1.125, -0.875, 0.625, -0.875, 0, 0, 0, 0]))
    std = group_advantages(r, 4, std_normalize=True)
    torch.testing.assert_close(std[:4], (r[:4] - r[:4].mean()) / (r[:4].std() + 1e-6))
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.ones(6), 4)


def test_group_advantages_of_lone_samples_are_the_rewards():
    """A group of one sample: A = r, as the official code (verl's mean 0, std 1 for a lone sample), not 0
    (which would silently train on nothing) nor NaN (the std of one number)."""
    r = torch.tensor([1.0, -1, 0.5])
    torch.testing.assert_close(group_advantages(r, 1), r)
    torch.testing.assert_close(group_advantages(r, 1, std_normalize=True), r / (1 + 1e-6))
    for bad in (0, 2.0):
        with pytest.raises(ValueError, match="group_size"):
            group_advantages(r, bad)


def test_kl_k3_nonnegative_and_zero_at_equality():
    a, b = torch.randn(100), torch.randn(100)
    assert (kl_k3(a, b) >= 0).all() and kl_k3(a, a).abs().max() == 0
    # k3 is an unbiased estimate of KL(p||q) with samples from p: check on a small discrete case
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.5, 0.25, 0.25])
    exact = (p * (p / q).log()).sum()
    expected_k3 = (p * kl_k3(p.log(), q.log())).sum()
    torch.testing.assert_close(expected_k3, exact)


def test_kl_k3_clamped_like_low_var_kl():
    """The official low_var_kl clamps the per-token value to [-10, 10]: a token whose reference
    log-prob is 5 nats above the policy's gives exp(5) - 5 - 1 = 142.4 unclamped, 10 clamped, and no
    gradient; values inside the range keep the plain formula and its gradient."""
    logp = torch.tensor([-6.0, -1.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.0, -1.2, -0.5])
    kl = kl_k3(logp, ref)
    plain = torch.exp(ref - logp) - (ref - logp) - 1
    assert plain[0].item() == pytest.approx(math.exp(5) - 6) and kl[0].item() == 10.0
    torch.testing.assert_close(kl[1:], plain[1:])
    kl.sum().backward()
    assert logp.grad[0] == 0 and logp.grad[1].item() == pytest.approx(1 - math.exp(-0.2))


def test_kl_k3_is_large_where_the_policy_made_a_token_less_likely():
    """The direction of k3's asymmetry (its docstring): 5 nats below the reference gives exp(5) - 6
    (clamped to 10), 5 nats above gives exp(-5) + 4."""
    ref = torch.zeros(2)
    kl = kl_k3(torch.tensor([-5.0, 5.0]), ref)
    assert kl[0].item() == 10.0 and kl[1].item() == pytest.approx(math.exp(-5) + 4)


def test_shape_errors():
    logp, old, adv, mask = random_case(4, 5, 0)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, adv[:3], mask, alpha=0.001)


# -----------------------------------------------------------------------------
# The RL update on a tiny model


def tiny_model(seed, vocab_size=64):
    from model import ModelConfig, Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    return Transformer(cfg).double()


def test_trainer_logprobs_are_the_samplers():
    """With padded rows (config vocab 64, tokenizer 40), the trainer's log-probs are those of the
    distribution the sampler drew from only when both cut the vocabulary at 40."""
    from degrpo import response_logprobs
    from sampler import generate

    model = tiny_model(0).float()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    outs = generate(model, prompts, 12, temperature=0.7, n=2, seed=0, vocab_size=40)
    flat_prompts = [p for p, group in zip(prompts, outs) for _ in group]
    responses = [c.tokens for group in outs for c in group]
    sampled = [torch.tensor(c.logprobs) for group in outs for c in group]
    with torch.no_grad():
        for vocab_size, expect_equal in ((40, True), (None, False)):
            lp = response_logprobs(model, flat_prompts, responses, 0.7, vocab_size)  # (4, T)
            gap = max((lp[i, :len(r)] - s).abs().max().item() for i, (r, s) in enumerate(zip(responses, sampled)))
            assert (gap < 1e-5) == expect_equal, (vocab_size, gap)


@pytest.mark.parametrize("alpha,loss_agg", [(0.001, None), (None, None), (0.001, "seq-mean"), (None, "token-mean")])
def test_rl_update_is_the_formula_with_kl_and_entropy_whatever_the_micro_batches(alpha, loss_agg):
    """One update (on-policy: ratio 1): loss = the policy loss of THINKLESS.md + beta * mean_tokens(k3 KL)
    - h * mean_tokens(entropy), the means over all response tokens of the step; the same loss and
    gradient with one micro-batch or many."""
    from degrpo import Rollout, RLConfig, response_logprobs, rl_update

    g = torch.Generator().manual_seed(0)
    G = 4
    prompts = [torch.randint(0, 40, (int(n),), generator=g).tolist() for n in (3, 3, 3, 3, 6, 6, 6, 6)]
    responses = [torch.randint(0, 40, (int(n),), generator=g).tolist() for n in torch.randint(2, 9, (8,), generator=g)]
    rewards = torch.tensor([1.0, -1.0, 0.5, -1.0, 1.0, 1.0, -1.0, 0.5])
    rollout = Rollout(prompts, responses, [[0.0] * len(r) for r in responses], rewards, [{} for _ in responses],
                      torch.zeros(8, dtype=torch.bool))
    adv = group_advantages(rewards, G)
    ref = tiny_model(1)
    results = []
    for budget in (1000, 12):  # one micro-batch, then one or two sequences at a time
        policy = tiny_model(0)
        cfg = RLConfig(group_size=G, temperature=0.8, alpha=alpha, beta=0.3, entropy_coef=0.2, updates_per_rollout=1,
                       micro_batch_tokens=budget, loss_agg=loss_agg)
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)
        grads = {}
        opt.step = lambda: grads.update({n: p.grad.clone() for n, p in policy.named_parameters()})
        metrics = rl_update(policy, ref, opt, rollout, adv, cfg)
        results.append((metrics["loss"], grads))
    # the formula, on the whole batch at once, with loops for the means
    policy = tiny_model(0)
    with torch.no_grad():
        logp, entropy = response_logprobs(policy, prompts, responses, 0.8, with_entropy=True)
        ref_logp = response_logprobs(ref, prompts, responses, 0.8)
    mask = torch.arange(logp.shape[1])[None] < torch.tensor([len(r) for r in responses])[:, None]
    tokens = [(i, t) for i in range(8) for t in range(len(responses[i]))]
    kl = sum(math.exp(ref_logp[i, t] - logp[i, t]) - (ref_logp[i, t] - logp[i, t]) - 1 for i, t in tokens) / len(tokens)
    ent = sum(entropy[i, t].item() for i, t in tokens) / len(tokens)
    expected = official_loss(logp, logp, adv, mask, alpha, loss_agg=loss_agg) + 0.3 * kl - 0.2 * ent
    assert kl > 1e-3 and ent > 0.1  # both terms matter in this case
    for loss, grads in results:
        assert loss == pytest.approx(float(expected), rel=1e-6)  # the stacked log-probs are fp32
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], msg=name)


def test_rollout_metrics_count_malformed_samples():
    """malformed: format errors of either mode, and samples without a control token (no mode)."""
    from degrpo import Rollout, rollout_metrics

    details = [{"mode": None, "correct": False, "format_ok": False},  # no control token
               {"mode": "think", "correct": False, "format_ok": False},  # chain never closed
               {"mode": "short", "correct": True, "format_ok": True},
               {"mode": "think", "correct": True, "format_ok": True}]
    responses = [[5, 6], [7], [8, 9, 10], [11]]
    rollout = Rollout([[1]] * 4, responses, [[0.0] * len(r) for r in responses], torch.tensor([-1.0, -1.0, 1.0, 0.5]),
                      details, torch.tensor([False, True, False, False]))
    m = rollout_metrics(rollout, group_size=2, device=torch.device("cpu"))
    assert (m["samples"], m["think"], m["short"], m["malformed"]) == (4, 2, 1, 2)


def test_stand_in_micro_batches_cost_two_tokens_and_change_nothing(monkeypatch):
    """A rank with fewer micro-batches than another runs padding ones (training.micro_batches under
    torch.distributed) in step with it: each is a forward (and backward) of two tokens, not one of the
    rank's real rows, and the updates' losses and gradients are those without them."""
    import collections

    import degrpo
    import training
    from degrpo import Rollout, RLConfig, rl_update

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 40, (5,), generator=g).tolist() for _ in range(8)]
    responses = [torch.randint(0, 40, (int(n),), generator=g).tolist() for n in torch.randint(10, 30, (8,), generator=g)]
    rewards = torch.tensor([1.0, -1.0, 0.5, -1.0, 1.0, 1.0, -1.0, 0.5])
    rollout = Rollout(prompts, responses, [[0.0] * len(r) for r in responses], rewards, [{} for _ in responses],
                      torch.zeros(8, dtype=torch.bool))
    runs = []
    for pad in (0, 1):
        real = training.micro_batches
        monkeypatch.setattr(degrpo, "micro_batches", lambda *a, **k: real(*a, **k) + [[]] * pad)
        policy, ref, tokens, steps = tiny_model(0), tiny_model(1), [], []
        for model in (policy, ref):
            model.register_forward_pre_hook(lambda m, args: tokens.append(args[0].numel()))
        cfg = RLConfig(group_size=4, temperature=0.8, beta=0.3, updates_per_rollout=2, micro_batch_tokens=70)
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)
        opt.step = lambda: steps.append({n: p.grad.clone() for n, p in policy.named_parameters()})
        metrics = rl_update(policy, ref, opt, rollout, group_advantages(rewards, 4), cfg)
        runs.append((metrics, steps, collections.Counter(tokens)))
    (m0, steps0, tokens0), (m1, steps1, tokens1) = runs
    # one stand-in in the old/ref pass (two models) and one in each of the two updates: 4 x 2 tokens
    assert tokens1 - tokens0 == collections.Counter({2: 4}) and not tokens0 - tokens1
    assert min(tokens0) > 30  # the real rows are long: a stand-in built from one would cost as much
    assert len(steps0) == len(steps1) == 2
    for a, b in zip(steps0, steps1):
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-12, rtol=0, msg=name)
    assert m0 == pytest.approx(m1, rel=1e-12)


def test_rollouts_are_graded_in_parallel(monkeypatch):
    """Grading waits on grader processes (up to a deadline each): a rank's responses are graded
    GRADERS at a time. The reward function below returns only once two calls run together."""
    import threading

    import degrpo
    from degrpo import RLConfig

    monkeypatch.setattr(degrpo, "GRADERS", 2)
    together = threading.Barrier(2, timeout=20)

    def reward_fn(tokens, answer):
        together.wait()  # serial grading: BrokenBarrierError after 20 s
        return float(tokens[0] % 2), {"mode": "short", "correct": answer}

    cfg = RLConfig(group_size=2, max_new_tokens=4, temperature=1.0)
    r = degrpo.sample_rollouts(tiny_model(0).float(), [[1, 2, 3], [4, 5]], ["a", "b"], reward_fn, cfg, seed=0,
                               eos_id=0, vocab_size=40)
    assert r.rewards.tolist() == [float(t[0] % 2) for t in r.responses]  # each reward with its own response
    assert [d["correct"] for d in r.details] == ["a", "a", "b", "b"] and r.prompts == [[1, 2, 3]] * 2 + [[4, 5]] * 2


def test_rollout_metrics_count_modes_per_level_and_malformed():
    from degrpo import Rollout, rollout_metrics

    modes = ["think", "short", None, "think", "short", "short", "think", "think"]
    levels = ["1", "1", "1", "1", "Level 5", "Level 5", "Level 5", "Level 5"]  # groups of 4, any labels
    format_ok = [True, True, False, False, True, True, True, True]  # None mode, then an unclosed chain
    details = [{"mode": m, "correct": True, "format_ok": ok, "level": lv} for m, ok, lv in zip(modes, format_ok, levels)]
    rollout = Rollout([[0]] * 8, [[1, 2]] * 8, [[0.0, 0.0]] * 8, torch.zeros(8), details, torch.zeros(8, dtype=torch.bool))
    m = rollout_metrics(rollout, 4, "cpu", level_names=["1", "Level 5", "unseen"])
    assert m["think_by_level"] == {"1": 2, "Level 5": 2, "unseen": 0}
    assert m["short_by_level"] == {"1": 1, "Level 5": 2, "unseen": 0}  # level 1's third sample chose no mode
    assert m["samples_by_level"] == {"1": 4, "Level 5": 4, "unseen": 0}
    assert (m["think"], m["short"], m["malformed"], m["samples"]) == (4, 3, 2, 8)
    plain = rollout_metrics(rollout, 4, "cpu")  # no level names: no per-level keys
    assert "think_by_level" not in plain and plain["think"] == 4
