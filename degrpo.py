"""
Decoupled GRPO (DeGRPO), the reinforcement-learning stage of Thinkless (THINKLESS.md section 4).

For each prompt the policy samples G responses; response token 0 is the control token c_i
(<think> or <short>), tokens 1..T_i are the answer. Every token of response i gets the group
advantage A_i = r_i - mean(r_1..r_G) (Dr. GRPO: no division by the std unless asked), and the
PPO-style clipped surrogate with rho = pi_theta / pi_old:

    L_{i,t} = -min(rho_{i,t} A_i, clip(rho_{i,t}, 1 - eps, 1 + eps) A_i)

Vanilla GRPO (alpha=None) treats the control token as one more token of the response. Two ways to
aggregate L over the n responses of an optimizer step (n = prompts x G), named as in verl and TRL
(loss_agg):

    seq-mean    (1/n) sum_i 1/(T_i+1) sum_{t=0..T_i} L_{i,t}   the paper's vanilla GRPO (its default)
    token-mean  (1/N) sum_i sum_{t=0..T_i} L_{i,t}             the official code's; N = all tokens

Under seq-mean the control token of response i weighs 1/(n (T_i+1)): a long response moves the mode
choice less than a short one, the imbalance the paper blames for its collapse to one mode. Under
token-mean every control token weighs 1/N, whatever its response's length. DeGRPO splits the two
objectives and gives the control term its own weight alpha:

    loss = alpha * (1/n) sum_i L_{i,0}  +  answer term  +  beta * KL  -  h * entropy
    answer term, token-mean: (1/N_ans) sum_{i, t>=1} L_{i,t}      the official code's (its default)
                 seq-mean:   (1/n) sum_i (1/T_i) sum_{t>=1} L_{i,t}   the paper's

The file has two layers. The pure functions (group_advantages, policy_loss, kl_k3) are the
formulas, tested against a direct transcription of the official ones. rl_step() is the loop
around them: sample from the current weights, score, compute advantages, then optimizer steps on
mini-batches whose losses are normalised over the whole mini-batch (all micro-batches, all
ranks), so the result does not depend on how a step is split. The caller (train.py) owns the
distributed setup and passes in the models and a reward function.
"""

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sampler import generate
from training import all_reduce_sum, batch_rows, clip_and_step, micro_batches, pad_batch, token_logprobs

LOSS_AGGS = ("seq-mean", "token-mean")  # policy_loss's aggregations (module docstring)

# -----------------------------------------------------------------------------
# The formulas


def group_advantages(rewards, group_size, std_normalize=False):
    """rewards [B*G] -> A [B*G], A_i = r_i - mean_group(r).

    The groups are read by position: samples g*G .. g*G + G-1 are prompt g's (the order generate() and
    sample_rollouts return). Rewards in another order (interleaved prompts, say) are averaged across
    prompts without an error: the official code groups by a prompt id instead.
    std_normalize=True is the original GRPO form A_i = (r_i - mean) / (std + 1e-6); the official
    Thinkless run uses the Dr. GRPO form without it. A group of one sample has no baseline: as in the
    official code (verl: mean 0, std 1 for a lone sample), A = r (r / (1 + 1e-6) with std_normalize).
    """
    if not (isinstance(group_size, int) and group_size >= 1):
        raise ValueError(f"group_size={group_size!r}: expected an int >= 1 (samples per prompt)")
    if rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")
    r = rewards.float().view(-1, group_size)  # (B, G)
    if group_size == 1:
        mean, std = torch.zeros_like(r), torch.ones_like(r)
    else:
        mean, std = r.mean(dim=1, keepdim=True), r.std(dim=1, keepdim=True)  # (B, 1) each
    adv = r - mean
    if std_normalize:
        adv = adv / (std + 1e-6)
    return adv.view(-1)


def policy_loss(logp, old_logp, advantages, mask, *, alpha, clip_eps=0.2, num_seqs=None, num_tokens=None,
                loss_agg=None):
    """The clipped surrogate, decoupled (DeGRPO: alpha, the control term's weight, a number; the official
    run's is 0.001) or vanilla GRPO (alpha=None). alpha has no default: the method is the caller's choice.
    loss_agg: "seq-mean" or "token-mean"; None takes the method's own default, which differs with alpha:
    seq-mean for vanilla GRPO (as the paper writes it), token-mean for DeGRPO's answer term (as the
    official code runs it). Pass it explicitly to compare the two methods under one aggregation.

    logp, old_logp, mask: [B, T], column 0 = the control token, mask = real response tokens.
    advantages: [B]. Returns (loss, clip fraction of the masked tokens).
    Denominators default to these tensors (one optimizer step in one call); the trainer passes the
    counts of the whole optimizer step instead, so that the sum of the micro-batches' losses is the
    step's loss:
      num_seqs = number of responses n (the control term, and every seq-mean)
      num_tokens = number of tokens N of a token-mean: answer tokens (t >= 1) for DeGRPO, all
                   response tokens (control token included) for vanilla GRPO
    A count given must be positive (0 is refused, not read as "not given"). The per-response
    1/(T_i+1) or 1/T_i of seq-mean is local to a row, so it needs no count.
    """
    if not (logp.shape == old_logp.shape == mask.shape) or advantages.shape != logp.shape[:1]:
        raise ValueError(f"shapes: logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, mask "
                         f"{tuple(mask.shape)} must match and advantages {tuple(advantages.shape)} must be [B]")
    loss_agg = ("seq-mean" if alpha is None else "token-mean") if loss_agg is None else loss_agg
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg={loss_agg!r}: expected one of {LOSS_AGGS}")
    for name, count in (("num_seqs", num_seqs), ("num_tokens", num_tokens)):
        if count is not None and not count > 0:
            raise ValueError(f"{name}={count!r}: expected a positive count, or None to count the mask's")
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)  # (B, T) rho = pi_theta / pi_old
    adv = advantages[:, None].float()  # (B, 1): every token of response i shares A_i
    unclipped, clipped = ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    per_token = -torch.min(unclipped, clipped) * mask  # (B, T) L_{i,t}
    clip_frac = ((clipped < unclipped).float() * mask).sum() / mask.sum().clamp(min=1)
    n = mask[:, 0].sum().clamp(min=1) if num_seqs is None else num_seqs

    def aggregate(L, m):  # L, m: (B, T') the tokens of one objective
        if loss_agg == "seq-mean":  # (1/n) sum_i (1/T'_i) sum_t L_{i,t}
            return (L.sum(1) / m.sum(1).clamp(min=1)).sum() / n
        return L.sum() / (m.sum().clamp(min=1) if num_tokens is None else num_tokens)  # (1/N) sum_{i,t} L_{i,t}

    if alpha is None:  # vanilla GRPO: the control token is one more token of the response
        return aggregate(per_token, mask), clip_frac
    control = per_token[:, 0].sum() / n  # (1/n) sum_i L_{i,0}
    return alpha * control + aggregate(per_token[:, 1:], mask[:, 1:]), clip_frac


def kl_k3(logp, ref_logp):
    """Per-token k3 estimator of KL(pi_theta || pi_ref): exp(ref - logp) - (ref - logp) - 1 >= 0,
    clamped to [-10, 10] as the official `low_var_kl`. It grows exponentially where the policy has made
    a token far LESS likely than the reference (ref - logp large) and only linearly where it has made
    one more likely; the clamp keeps one such token from dominating the step."""
    log_ratio = ref_logp - logp
    return (torch.exp(log_ratio) - log_ratio - 1).clamp(-10, 10)


# -----------------------------------------------------------------------------
# The RL step

# Responses graded at once. A grading call mostly waits on a grader process (rewards.py: one per
# calling thread, each call bounded by its deadline of a few seconds), so threads grade in parallel,
# and a rank's grading takes at most ceil(responses / GRADERS) deadlines, not one per response.
GRADERS = min(8, os.cpu_count() or 1)


@dataclass
class RLConfig:
    group_size: int = 8  # G samples per prompt
    temperature: float = 0.6
    max_new_tokens: int = 24576
    alpha: float | None = 0.001  # control-token weight; None = vanilla GRPO
    clip_eps: float = 0.2
    beta: float = 0.001  # k3 KL to the frozen reference
    entropy_coef: float = 0.001
    std_normalize: bool = False
    loss_agg: str | None = None  # "seq-mean" | "token-mean"; None: seq-mean for vanilla GRPO, token-mean for DeGRPO
    drop_equal_groups: bool = False  # drop groups whose rewards are all equal (off in the official run)
    updates_per_rollout: int = 2  # optimizer steps per rollout batch (mini-batches of prompts)
    micro_batch_tokens: int = 32768  # token budget of one forward/backward
    max_batch: int = 64  # rows the sampler decodes together
    compile: bool = False  # the sampler's decode step compiled, with CUDA graphs (sampler.generate)
    grad_clip: float = 1.0


@dataclass
class Rollout:
    """One rank's sampled batch, flattened to B*G responses in group order."""

    prompts: list  # [B*G] prompt ids (repeated G times)
    responses: list  # [B*G] response ids (control token first)
    sampler_logp: list  # [B*G] sampler log-probs per response token
    rewards: torch.Tensor  # (B*G,)
    details: list  # [B*G] whatever reward_fn returned beside the reward (mode, correct, ...)
    truncated: torch.Tensor  # (B*G,) bool


def sample_rollouts(sampler_model, prompt_ids, answers, reward_fn, cfg: RLConfig, seed, eos_id, vocab_size,
                    first_index=0, cache=None):
    """G samples per prompt from the (unsharded) sampler copy, scored by reward_fn(tokens, answer)
    -> (reward, details dict with at least "mode" and "correct"), GRADERS calls at a time (threads).
    first_index: the position of prompt_ids[0] in the global batch, so that each rank draws the samples
    a single process would. cache: the run's KV cache (sampler.new_cache), reused by every rollout."""
    outs = generate(sampler_model, prompt_ids, cfg.max_new_tokens, temperature=cfg.temperature, stop_ids=(eos_id,),
                    n=cfg.group_size, seed=seed, vocab_size=vocab_size, max_batch=cfg.max_batch,
                    first_index=first_index, compile=cfg.compile, cache=cache)
    samples = [(p, answer, c) for p, answer, group in zip(prompt_ids, answers, outs) for c in group]
    with ThreadPoolExecutor(max_workers=GRADERS) as graders:
        scored = list(graders.map(lambda s: reward_fn(s[2].tokens, s[1]), samples))  # [(reward, details)]
    prompts, _, completions = zip(*samples)
    rewards, details = zip(*scored)
    return Rollout(list(prompts), [c.tokens for c in completions], [c.logprobs for c in completions],
                   torch.tensor(rewards, dtype=torch.float32), list(details),
                   torch.tensor([c.finish_reason == "length" for c in completions]))


def response_logprobs(model, prompts, responses, temperature, vocab_size=None, with_entropy=False):
    """Log-probs (and entropies) of the response tokens: [B, T] right-padded, column 0 = control.
    Under softmax(logits / temperature) over the first vocab_size rows: the sampler's distribution."""
    idx, targets, starts = pad_batch(prompts, responses, model_device(model))
    logp, entropy = token_logprobs(model, idx, targets, temperature, with_entropy, vocab_size)  # (B, L) each
    T = max(len(r) for r in responses)
    cols = (starts[:, None] + torch.arange(T, device=idx.device)).clamp(max=idx.shape[1] - 1)  # (B, T)
    logp = logp.gather(1, cols)
    return (logp, entropy.gather(1, cols)) if with_entropy else logp


def model_device(model):
    return next(model.parameters()).device


def response_mask(responses, device):
    T = max(len(r) for r in responses)
    lens = torch.tensor([len(r) for r in responses], device=device)
    return torch.arange(T, device=device)[None, :] < lens[:, None]  # (B, T)


def rl_update(policy, ref_model, optimizer, rollout: Rollout, advantages, cfg: RLConfig, world_size=1, first_index=0,
              vocab_size=None):
    """cfg.updates_per_rollout optimizer steps over mini-batches of the rollout; returns metrics.
    Log-probs are over the first vocab_size rows of lm_head, the rows the sampler draws from.
    Mini-batch k holds the groups whose global prompt index (first_index + local index) is k modulo
    updates_per_rollout: the same mini-batches however the batch is split over ranks.
    world_size: each rank's loss is its share of the whole step's loss, scaled by world_size before
    backward because the policy is assumed to AVERAGE gradients over ranks, as FSDP2 (and DDP) do.
    Where gradients are summed over ranks instead, pass world_size=1."""
    device = model_device(policy)
    n = len(rollout.responses)
    keep = [i for i in range(n) if not (cfg.drop_equal_groups and rollout.details[i].get("group_equal"))]
    lengths = [len(rollout.prompts[i]) + len(rollout.responses[i]) for i in range(n)]
    sampler_logp = [torch.tensor(rollout.sampler_logp[i]) for i in range(n)]
    # Old and reference log-probs are fixed for the whole rollout: computed once, without grad.
    old_logp, ref_logp = [None] * n, [None] * n
    with torch.no_grad():
        for mb in micro_batches(range(n), lengths, cfg.micro_batch_tokens, device):
            # an empty micro-batch keeps this rank in step (FSDP): a two-token stand-in, its result unused
            prompts, responses = batch_rows(mb, rollout.prompts, rollout.responses)
            for store, model, needed in ((old_logp, policy, cfg.updates_per_rollout > 1), (ref_logp, ref_model, cfg.beta)):
                if needed:  # on-policy with one update: old = current logp, detached in the loop below
                    lp = response_logprobs(model, prompts, responses, cfg.temperature, vocab_size)  # (b, T)
                    for j, i in enumerate(mb):
                        store[i] = lp[j, : len(responses[j])]
    per_update = []  # the metrics of each optimizer step taken
    U = cfg.updates_per_rollout
    splits = [[i for i in keep if (first_index + i // cfg.group_size) % U == k] for k in range(U)]
    for split in splits:
        # Denominators of the whole mini-batch, summed over ranks: each micro-batch's loss is a sum
        # divided by these, times world_size because FSDP/DDP average gradients over ranks (docstring).
        counts = torch.tensor([len(split), sum(len(rollout.responses[i]) - 1 for i in split),
                               sum(len(rollout.responses[i]) for i in split)], dtype=torch.float64)
        num_seqs, num_answer, num_all = all_reduce_sum(counts, device).tolist()
        if num_seqs == 0:
            continue
        names = ("loss", "clip_frac", "kl", "entropy", "logp_gap", "tokens")  # sums over this update's tokens
        stats = torch.zeros(len(names), dtype=torch.float64)
        for mb in micro_batches(split, lengths, cfg.micro_batch_tokens, device):
            prompts, responses = batch_rows(mb, rollout.prompts, rollout.responses)
            mask = response_mask(responses, device) & bool(mb)  # (b, T), all False in a stand-in micro-batch
            logp, entropy = response_logprobs(policy, prompts, responses, cfg.temperature, vocab_size, with_entropy=True)
            old = _stack([old_logp[i] for i in mb], mask) if cfg.updates_per_rollout > 1 else logp.detach()
            adv = advantages[mb] if mb else torch.zeros(1)  # (b,)
            loss, clip_frac = policy_loss(logp, old, adv.to(device), mask, alpha=cfg.alpha,
                                          clip_eps=cfg.clip_eps, num_seqs=num_seqs,
                                          num_tokens=num_all if cfg.alpha is None else max(num_answer, 1),
                                          loss_agg=cfg.loss_agg)
            m = mask.float()
            kl = kl_k3(logp, _stack([ref_logp[i] for i in mb], mask)) if cfg.beta else torch.zeros_like(logp)
            loss = loss + cfg.beta * (kl * m).sum() / num_all - cfg.entropy_coef * (entropy * m).sum() / num_all
            (loss * world_size).backward()
            gap = (logp.detach() - _stack([sampler_logp[i] for i in mb], mask)).abs()  # (b, T) |trainer - sampler|
            stats += torch.tensor([loss.item(), clip_frac.item() * m.sum().item()] +
                                  [(x.detach() * m).sum().item() for x in (kl, entropy, gap)] + [m.sum().item()],
                                  dtype=torch.float64)
        sums = dict(zip(names, all_reduce_sum(stats, device).tolist()))
        if not math.isfinite(sums["loss"]):
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"non-finite RL loss {sums['loss']} (stopping before the optimizer step)")
        tokens = sums.pop("tokens")
        per_update.append({"loss": sums.pop("loss"), **{k: v / tokens for k, v in sums.items()},
                           "grad_norm": clip_and_step(policy, optimizer, cfg.grad_clip)})
    keys = ("loss", "clip_frac", "kl", "entropy", "logp_gap", "grad_norm")
    return {k: sum(u[k] for u in per_update) / max(len(per_update), 1) for k in keys}


def _stack(rows, mask):
    """List of 1-D tensors -> [B, T] zero-padded like mask."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for j, r in enumerate(rows):
        out[j, : len(r)] = r.to(mask.device)
    return out


def rollout_metrics(rollout: Rollout, group_size, device, level_names=()):
    """Counts summed over ranks: think/short/malformed samples, accuracy per mode, all-correct/all-wrong
    groups... With level_names (every label of the data set, the same list on every rank) and a
    "level" in each sample's details: think_by_level, short_by_level and samples_by_level, {label:
    count}, the share of each mode per level of this step's batch (the rest chose no control token)."""
    modes = [d.get("mode") for d in rollout.details]
    correct = torch.tensor([bool(d.get("correct")) for d in rollout.details])
    think = torch.tensor([m == "think" for m in modes])
    short = torch.tensor([m == "short" for m in modes])
    # malformed: no control token, or a format error (unclosed chain, no \boxed{} answer)
    malformed = torch.tensor([m not in ("think", "short") or not d.get("format_ok", True)
                              for m, d in zip(modes, rollout.details)])
    lengths = torch.tensor([len(r) for r in rollout.responses], dtype=torch.float64)
    groups = correct.view(-1, group_size)
    levels = [str(d.get("level")) for d in rollout.details]
    by_level = []  # think, short, samples of each label
    for name in level_names:
        rows = [i for i, lv in enumerate(levels) if lv == name]
        by_level += [think[rows].sum(), short[rows].sum(), len(rows)]
    sums = torch.tensor([len(modes), think.sum(), short.sum(), (correct & think).sum(), (correct & short).sum(),
                         correct.sum(), groups.all(1).sum(), (~groups).all(1).sum(), groups.shape[0],
                         rollout.rewards.sum(), lengths.sum(), rollout.truncated.sum(), malformed.sum()]
                        + by_level, dtype=torch.float64)
    s = all_reduce_sum(sums, device).tolist()
    max_len = torch.tensor([lengths.max().item()], dtype=torch.float64)
    if dist.is_initialized():
        max_len = max_len.to(device)
        dist.all_reduce(max_len, op=dist.ReduceOp.MAX)
    n = max(s[0], 1)
    metrics = {"samples": int(s[0]), "think": int(s[1]), "short": int(s[2]), "malformed": int(s[12]),
               "acc_think": s[3] / max(s[1], 1), "acc_short": s[4] / max(s[2], 1), "accuracy": s[5] / n,
               "groups_all_correct": int(s[6]), "groups_all_wrong": int(s[7]), "groups": int(s[8]),
               "reward": s[9] / n, "response_len": s[10] / n, "response_len_max": int(max_len.item()),
               "truncated_frac": s[11] / n}
    if level_names:
        for j, key in enumerate(("think_by_level", "short_by_level", "samples_by_level")):
            metrics[key] = {name: int(s[13 + 3 * k + j]) for k, name in enumerate(level_names)}
    return metrics


def rl_step(policy, sampler_model, ref_model, optimizer, prompt_ids, answers, reward_fn, cfg: RLConfig, seed,
            eos_id, vocab_size, first_index=0, world_size=1, cache=None, levels=None, level_names=()):
    """One rollout batch: sample, score, advantages, cfg.updates_per_rollout optimizer steps. Metrics dict.
    cache: the sampler's KV cache, allocated once per run (sampler.new_cache); None: one per rollout.
    levels: this rank's prompts' labels (e.g. difficulty), level_names: all labels of the data set;
    both given, the metrics hold the think share per level (rollout_metrics)."""
    device = model_device(policy)
    t0 = time.time()
    rollout = sample_rollouts(sampler_model, prompt_ids, answers, reward_fn, cfg, seed, eos_id, vocab_size,
                              first_index, cache)
    t1 = time.time()
    advantages = group_advantages(rollout.rewards, cfg.group_size, cfg.std_normalize)
    equal = (rollout.rewards.view(-1, cfg.group_size) == rollout.rewards.view(-1, cfg.group_size)[:, :1]).all(1)
    for i, d in enumerate(rollout.details):
        d["group_equal"] = bool(equal[i // cfg.group_size])
        if levels is not None:
            d["level"] = levels[i // cfg.group_size]
    metrics = rollout_metrics(rollout, cfg.group_size, device, level_names if levels is not None else ())
    metrics.update(rl_update(policy, ref_model, optimizer, rollout, advantages, cfg, world_size, first_index, vocab_size))
    metrics.update(rollout_time=t1 - t0, update_time=time.time() - t1)
    return metrics
