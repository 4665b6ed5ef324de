"""
The warm-up distillation of Thinkless (THINKLESS.md section 3): teach one model both answer styles.

Two experts answer the same prompts: a reasoning model (a long chain, prefixed <think>) and an
instruction model (a concise answer, prefixed <short>). The student is trained on both responses
of every prompt, so that after this stage the first generated token picks the style and the
choice is near 50/50: reinforcement learning, not the data, then decides the routing.

Loss: -sum log p(response tokens | prompt) over the assistant tokens only (control token and end
of sentence included), divided by the number of such tokens in the WHOLE optimizer step (every
micro-batch on every rank). Dividing per micro-batch instead would make the gradient depend on
how the step is split. Padding, micro-batches, the fused log-probs and the clipped step are in
training.py, which DeGRPO shares.
"""

import json
import math

import torch

from training import all_reduce_sum, batch_rows, clip_and_step, micro_batches, pad_batch, token_logprobs

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


# -----------------------------------------------------------------------------
# The step


def sft_step(model, optimizer, prompts, responses, micro_batch_tokens, grad_clip=1.0, world_size=1):
    """One optimizer step on this rank's share of the batch. Returns {"loss", "grad_norm", "tokens"}.
    world_size: the loss, normalised over the whole step, is scaled by world_size before backward because
    the model is assumed to AVERAGE gradients over ranks, as FSDP2 (and DDP) do; where gradients are
    summed over ranks instead, pass world_size=1."""
    device = next(model.parameters()).device
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    num_tokens = all_reduce_sum(torch.tensor([float(sum(map(len, responses)))], dtype=torch.float64), device).item()
    loss_sum = torch.zeros(1, dtype=torch.float64)
    for mb in micro_batches(range(len(prompts)), lengths, micro_batch_tokens, device):
        # an empty micro-batch keeps this rank in step with the others: a stand-in, its loss zeroed
        idx, targets, _ = pad_batch(*batch_rows(mb, prompts, responses), device)
        logp, _ = token_logprobs(model, idx, targets)  # (b, L), 0 outside the responses
        loss = -logp.sum() / num_tokens * bool(mb)
        # FSDP/DDP average gradients over ranks; the loss is already normalised globally.
        (loss * world_size).backward()
        loss_sum += loss.item()
    loss = all_reduce_sum(loss_sum, device).item()
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"non-finite SFT loss {loss} (stopping before the optimizer step)")
    return {"loss": loss, "grad_norm": clip_and_step(model, optimizer, grad_clip), "tokens": int(num_tokens)}


def cosine_lr(step, total_steps, peak_lr, min_lr, warmup_frac=0.05):
    """Linear warm-up over warmup_frac of the steps, then cosine decay from peak_lr to min_lr."""
    warmup = max(1, round(warmup_frac * total_steps))
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
