"""
The machinery both training stages share (sft.py and degrpo.py import it; neither imports the other).

- pad_batch: prompt + response id lists -> one right-padded batch whose targets are the response
  tokens only (IGNORE elsewhere): the hidden state at column j predicts token j + 1.
- micro_batches: rows grouped under a token budget (rows x longest row), so that one forward and
  backward never holds more activations than the budget allows, whatever the lengths; under
  torch.distributed, padded with empty ones that batch_rows turns into a two-token stand-in.
- token_logprobs: log p of the target tokens through logprob_kernels/ (fused: never the [tokens, vocab]
  logits, the first out-of-memory of every GRPO trainer at 151936 rows).
- all_reduce_sum: the counts a loss is divided by, summed over ranks, so that N ranks compute the
  step one process would.
- clip_and_step: gradient clipping and the optimizer step, refusing a non-finite gradient.
"""

import math

import torch
import torch.distributed as dist

from logprob_kernels import fused_logprobs

IGNORE = -100

# -----------------------------------------------------------------------------
# Batches


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
    caller runs an empty one on batch_rows' stand-in with its loss multiplied by 0."""
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


def batch_rows(mb, prompts, responses):
    """The prompts and responses of micro-batch mb (indices into them). An empty one (padding, see
    micro_batches) gets a stand-in: one prompt token and one response token, the cheapest forward and
    backward that still runs FSDP's collectives, while the other ranks wait (not this rank's first
    row, which can be 25k tokens long). The caller multiplies its loss by 0."""
    return ([prompts[i] for i in mb], [responses[i] for i in mb]) if mb else ([[0]], [[0]])


# -----------------------------------------------------------------------------
# Log-probs, the cross-rank sum and the step


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
        # a new (B, L) tensor, not a view of a flat one: FSDP2 warns about views returned from forward
        # (an in-place op on one would skip its backward hook)
        scatter = lambda x: torch.zeros(B, L, dtype=torch.float32, device=x.device).index_put((rows // L, rows % L), x)
        return scatter(logp), (scatter(entropy) if with_entropy else None)

    return model(idx, head=head)


def all_reduce_sum(t, device):
    """Sum of a small CPU tensor over ranks (no-op without torch.distributed); returns it on the CPU."""
    if not dist.is_initialized():
        return t
    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


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
