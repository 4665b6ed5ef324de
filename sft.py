"""
The warm-up distillation of Thinkless (THINKLESS.md section 3): teach one model both answer styles.

Two experts answer the same prompts: a reasoning model (a long chain, prefixed <think>) and an
instruction model (a concise answer, prefixed <short>). The student is trained on both responses
of every prompt, so that after this stage the first generated token picks the style and the
choice is near 50/50: reinforcement learning, not the data, then decides the routing.

Loss: -sum log p(response tokens | prompt) over the assistant tokens only (control token and end
of sentence included), divided by the number of such tokens in the WHOLE optimizer step (every
micro-batch on every rank). Dividing per micro-batch instead would make the gradient depend on
how the step is split. Log-probs come from kernels/ (fused: never the [tokens, vocab] logits).

This file also holds the pieces DeGRPO reuses: padding prompt+response pairs into a batch, the
fused per-token log-probs of a batch, token-budget micro-batches and the cross-rank sum.
"""

import json
import math

import torch
import torch.distributed as dist

from kernels import fused_logprobs

IGNORE = -100

# -----------------------------------------------------------------------------
# Data


def read_sft_jsonl(path):
    """[(question, response)] from JSONL records {"prompt", "response"} or the released format
    {"instruction", "output"}; the response must start with its control token."""
    pairs = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
            question = rec.get("prompt", rec.get("instruction")) if isinstance(rec, dict) else None
            response = rec.get("response", rec.get("output")) if isinstance(rec, dict) else None
            if not isinstance(question, str) or not isinstance(response, str):
                raise ValueError(f"{path}:{line_no}: expected string fields prompt/response or instruction/output")
            if not response.lstrip().startswith(("<think>", "<short>")):
                raise ValueError(f"{path}:{line_no}: response must start with <think> or <short>, "
                                 f"got {response[:30]!r}")
            pairs.append((question, response.lstrip()))
    if not pairs:
        raise ValueError(f"{path}: no records")
    return pairs


def pad_batch(prompts, responses, device):
    """Token-id lists -> idx (B, L) right-padded with 0, targets (B, L), starts (B,).

    targets[b, j] is the token at j+1 when it is a response token, else IGNORE: the hidden state
    at j predicts token j+1. Response token t of row b is predicted at column starts[b] + t.
    """
    L = max(len(p) + len(r) for p, r in zip(prompts, responses))
    idx = torch.zeros(len(prompts), L, dtype=torch.long)
    targets = torch.full((len(prompts), L), IGNORE, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        seq = torch.tensor(p + r)
        idx[b, : len(seq)] = seq
        targets[b, len(p) - 1: len(seq) - 1] = seq[len(p):]
    starts = torch.tensor([len(p) - 1 for p in prompts])
    return idx.to(device), targets.to(device), starts.to(device)


def micro_batches(indices, lengths, token_budget, device="cpu"):
    """Groups indices (sorted longest first) so that rows x longest row stays within token_budget.

    Under torch.distributed the list is padded with empty micro-batches up to the longest list of
    any rank: FSDP all-gathers weights in every forward, so every rank must run as many. The
    caller runs an empty one on a stand-in row with its loss multiplied by 0."""
    batches, current = [], []
    for i in sorted(indices, key=lambda i: -lengths[i]):
        if current and lengths[current[0]] * (len(current) + 1) > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    batches = batches + [current] if current else batches
    if dist.is_initialized():
        n = torch.tensor([len(batches)], device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        batches += [[] for _ in range(int(n.item()) - len(batches))]
    return batches


# -----------------------------------------------------------------------------
# Log-probs and the step


def token_logprobs(model, idx, targets, temperature=1.0, with_entropy=False, vocab_size=None):
    """logp (B, L) of targets (0 where IGNORE) under softmax(logits / temperature), and the
    entropy (B, L) of that distribution when asked. Only the target rows go through the fused kernel.
    vocab_size: the softmax runs over the first vocab_size rows of lm_head only, the set the sampler
    draws from (the padded rows beyond the tokenizer's ids are never sampled), so that the trainer's
    log-probs are those of the sampler's distribution."""
    B, L = idx.shape
    flat_targets = targets.reshape(-1)  # (B*L,)
    rows = (flat_targets != IGNORE).nonzero().squeeze(1)  # (N,) positions with a target

    def head(hidden, weight):  # hidden (B, L, H), weight (V, H): runs inside forward (FSDP hooks)
        h = hidden.reshape(B * L, -1).index_select(0, rows)  # (N, H)
        out = fused_logprobs(h, weight[:vocab_size], flat_targets[rows], temperature=temperature,
                             return_entropy=with_entropy)
        logp, entropy = out if with_entropy else (out, None)
        scatter = lambda x: torch.zeros(B * L, dtype=torch.float32, device=x.device).index_copy(0, rows, x).view(B, L)
        return scatter(logp), (scatter(entropy) if with_entropy else None)

    return model(idx, head=head)


def all_reduce_sum(t, device):
    """Sum of a small CPU tensor over ranks (no-op without torch.distributed); returns it on the CPU."""
    if not dist.is_initialized():
        return t
    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


def sft_step(model, optimizer, prompts, responses, micro_batch_tokens, grad_clip=1.0, world_size=1):
    """One optimizer step on this rank's share of the batch. Returns {"loss", "grad_norm", "tokens"}."""
    device = next(model.parameters()).device
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    num_tokens = all_reduce_sum(torch.tensor([float(sum(map(len, responses)))], dtype=torch.float64), device).item()
    loss_sum = torch.zeros(1, dtype=torch.float64)
    for mb in micro_batches(range(len(prompts)), lengths, micro_batch_tokens, device):
        real, mb = bool(mb), mb or [0]  # an empty micro-batch keeps this rank in step with the others
        idx, targets, _ = pad_batch([prompts[i] for i in mb], [responses[i] for i in mb], device)
        logp, _ = token_logprobs(model, idx, targets)  # (b, L), 0 outside the responses
        loss = -logp.sum() / num_tokens * real
        # FSDP/DDP average gradients over ranks; the loss is already normalised globally.
        (loss * world_size).backward()
        loss_sum += loss.item()
    loss = all_reduce_sum(loss_sum, device).item()
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"non-finite SFT loss {loss} (stopping before the optimizer step)")
    return {"loss": loss, "grad_norm": clip_and_step(model, optimizer, grad_clip), "tokens": int(num_tokens)}


def clip_and_step(model, optimizer, grad_clip):
    """Clips the gradients to norm grad_clip and steps; returns the norm before clipping. A
    non-finite gradient (with a finite loss: an overflow in the backward) stops the run before the
    step writes it into the weights."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"non-finite gradient norm {grad_norm} (stopping before the optimizer step)")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def cosine_lr(step, total_steps, peak_lr, min_lr, warmup_frac=0.05):
    """Linear warm-up over warmup_frac of the steps, then cosine decay from peak_lr to min_lr."""
    warmup = max(1, round(warmup_frac * total_steps))
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
