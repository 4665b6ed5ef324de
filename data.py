"""
The training data of train.py: a stage's JSONL read and tokenized (load_items), and the items each rank
takes at each step (batch_indices).

The order derives from (seed, step) alone, never from what ran before: a run resumed at step k, a run
stopped by its scheduler and continued, and a run on N ranks or N nodes all see the batches one
uninterrupted process sees. Each rank takes a contiguous slice of the global batch, by its global
rank (not the rank within its node).
"""

import functools
import random

import chat
import eval as evaluation
import sft


def load_items(cfg, tokenizer, eos_id, model_dir):
    """The training items of cfg.data (train.TrainConfig), tokenized, and a line that counts them:
    sft (prompt ids, response ids + eos) pairs within --max-len, rl (prompt ids, answer, level)
    problems within --max-prompt-len, the prompts rendered by model_dir's chat template."""
    if cfg.stage == "sft":
        pairs = sft.read_sft_jsonl(cfg.data)
        examples = [(chat.encode_prompt(tokenizer, q), tokenizer.encode(r, add_special_tokens=False).ids + [eos_id])
                    for q, r in pairs]
        items = [e for e in examples if len(e[0]) + len(e[1]) <= cfg.max_len]
        line = f"sft: {len(items)} pairs ({len(examples) - len(items)} dropped over {cfg.max_len} tokens)"
    else:
        problems = evaluation.load_problems(cfg.data, skip_unanswered=True)
        items = [(chat.encode_prompt(tokenizer, p["problem"], template_dir=model_dir), p["answer"], p.get("level"))
                 for p in problems]
        items = [it for it in items if len(it[0]) <= cfg.max_prompt_len]
        line = f"rl: {len(items)} problems ({len(problems) - len(items)} skipped over {cfg.max_prompt_len} prompt tokens)"
    if not items:
        raise ValueError(f"{cfg.data}: no item within the length limits")
    return items, line


@functools.lru_cache(maxsize=2)
def epoch_order(n_items, seed, epoch):
    """The data order of one epoch: a permutation derived from (seed, epoch), so a resumed run sees
    the same order. Cached: a step reads at most two epochs."""
    order = list(range(n_items))
    random.Random(seed * 100003 + epoch).shuffle(order)
    return order


def batch_indices(n_items, batch_size, step, seed, rank, world):
    """This rank's slice of the global batch of `step`, and the global position of its first item
    (the sampler's draws are keyed by it, so N ranks sample what one process would)."""
    per_rank = batch_size // world
    first = step * batch_size + rank * per_rank
    return [epoch_order(n_items, seed, pos // n_items)[pos % n_items] for pos in range(first, first + per_rank)], first
