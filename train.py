"""
The entry point: `python train.py` runs the toy demo on a CPU; `torchrun --nproc_per_node=4
train.py --stage sft|rl --model DIR --data FILE ...` runs a stage of Thinkless for real.

Defaults are the official hyperparameters for DeepSeek-R1-Distill-Qwen-1.5B (THINKLESS.md
sections 3 and 4); flags that default to None take the stage's official value.

Distributed layout (torch.distributed, gloo on CPU, NCCL on GPU):
  - The trained model is sharded with FSDP2 (`fully_shard` on every block, then the root), bf16
    compute on GPU, fp32 master weights and fp32 gradient reduction, so one script scales from
    one GPU to several and to a 7B model.
  - Each rank takes a contiguous slice of the global batch. Losses are normalised by counts summed
    over all ranks (sft.py, degrpo.py), so N ranks compute the same step as one rank.
  - RL samples from an unsharded copy of the current weights (bf16 on GPU), refreshed after every
    update: gathering sharded weights at every decode step would make rollouts crawl.
Checkpoints (checkpoint.py): out/step_NNNNNN/ is a Hugging Face folder that transformers and
eval.py load, plus the sharded trainer state, written atomically. The data order and the sampling
seeds derive from (seed, step), so --resume continues exactly. The toy demo's driver is in toy.py.
"""

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import random
import socket
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import chat
import degrpo
import eval as evaluation
import sft
from checkpoint import current_device, full_tensors, latest_checkpoint, load_checkpoint, save_checkpoint, trim_metrics
from model import Transformer
from rewards import reward_details, score

# -----------------------------------------------------------------------------
# Config


def arg(default, help):  # a config field and its --help text
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    preset: str | None = arg(None, "toy (the default without --model) or long: the CPU demo end to end (toy.PRESETS)")
    stage: str = arg("rl", "sft (warm-up distillation) or rl (DeGRPO)")
    model: str | None = arg(None, "Hugging Face checkpoint folder to start from")
    data: str | None = arg(None, "sft: JSONL {prompt, response}; rl: JSONL {problem, answer}")
    out: str = arg("runs/thinkless", "checkpoints and metrics.jsonl go here")
    steps: int | None = arg(None, "optimizer steps (sft) / rollout batches (rl); default: one pass over the data")
    batch_size: int = arg(128, "global: sequences per sft step, prompts per rl step")
    lr: float | None = arg(None, "peak lr; default 1e-5 (sft, cosine) / 1e-6 (rl, constant)")
    min_lr: float = arg(1e-6, "sft: end of the cosine decay")
    warmup_frac: float = arg(0.05, "sft: share of steps in linear warm-up")
    weight_decay: float | None = arg(None, "AdamW; default 0.1 (sft) / 0.01 (rl)")
    grad_clip: float = 1.0
    max_len: int = arg(16384, "sft: drop pairs longer than this many tokens")
    max_prompt_len: int = arg(1024, "rl: skip problems whose prompt is longer")
    max_new_tokens: int = arg(24576, "rl: response length cap")
    micro_batch_tokens: int = arg(32768, "tokens (rows x longest) per forward/backward")
    grad_checkpointing: bool = arg(False, "recompute blocks in backward")
    group_size: int = 8
    temperature: float = 0.6
    alpha: str | None = arg(None, "DeGRPO control-token weight (default 0.001, the toy: 1.0), or 'none' for vanilla GRPO")
    beta: float = arg(0.001, "k3 KL weight (0: no reference model)")
    entropy_coef: float = 0.001
    clip_eps: float = 0.2
    correct_think: float = arg(0.5, "reward of a correct think answer (short: 1.0)")
    updates_per_rollout: int = arg(2, "optimizer steps per rollout batch")
    std_normalize: bool = arg(False, "divide advantages by the group std")
    loss_agg: str | None = arg(None, "seq-mean (per response, then over responses) or token-mean (over all tokens "
                               "of the step); default: seq-mean for vanilla GRPO, token-mean for DeGRPO's answer term")
    drop_equal_groups: bool = False
    max_batch: int = arg(64, "rows the sampler decodes together")
    save_every: int = 50
    keep_last: int = 3
    resume: bool = arg(False, "continue from the newest checkpoint in --out")
    seed: int = 0

    def stage_default(self, name, sft_value, rl_value):
        value = getattr(self, name)
        return value if value is not None else (sft_value if self.stage == "sft" else rl_value)


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=f.metadata.get("help", " "))
        else:
            kind = {int: int, float: float}.get(f.type) or {"int | None": int, "float | None": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata.get("help", " "))
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    if cfg.stage not in ("sft", "rl"):
        parser.error(f"--stage must be sft or rl, got {cfg.stage!r}")
    if cfg.preset is None and cfg.model is None:
        cfg.preset = "toy"
    if cfg.preset is not None:  # the toy sets these itself: a flag that would be ignored is refused
        import toy

        if cfg.preset not in toy.PRESETS:
            parser.error(f"--preset must be one of {', '.join(toy.PRESETS)}, got {cfg.preset!r}")
        fixed = {"stage", "model", "data"} | set(toy.PRESETS[cfg.preset].sft) | set(toy.PRESETS[cfg.preset].rl)
        ignored = sorted(f"--{name.replace('_', '-')}" for name in fixed if getattr(cfg, name) != getattr(TrainConfig(), name))
        if ignored:
            parser.error(f"the toy demo sets {', '.join(ignored)} itself (toy.py); give --model and --data to run a stage")
    if cfg.preset is None and cfg.data is None:
        parser.error("--data is required with --model")
    for name in ("keep_last", "save_every", "batch_size", "group_size", "micro_batch_tokens", "max_batch"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.loss_agg not in (None,) + degrpo.LOSS_AGGS:
        parser.error(f"--loss-agg must be one of {', '.join(degrpo.LOSS_AGGS)}, got {cfg.loss_agg!r}")
    if cfg.alpha is not None and cfg.alpha.lower() != "none":
        try:
            float(cfg.alpha)
        except ValueError:
            parser.error(f"--alpha must be a number or 'none', got {cfg.alpha!r}")
    return cfg


# -----------------------------------------------------------------------------
# Distributed setup


def setup_distributed():
    """(rank, world_size, device); initialises the process group under torchrun, and on a GPU
    without torchrun a group of one, so that one GPU runs the sharded bf16 path of N GPUs."""
    if "RANK" not in os.environ:
        if not torch.cuda.is_available():
            return 0, 1, torch.device("cpu")
        with socket.socket() as s:  # a free port for the group's rendezvous
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="localhost", MASTER_PORT=str(port))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=30))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    return rank, world, device


def shard(model, device):
    """FSDP2: every block a unit, then the root (embeddings, final norm, lm_head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if device.type == "cuda" else None, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def copy_weights(src_model, dst_model):
    """Refreshes the unsharded sampler copy from the trained (sharded) model."""
    with torch.no_grad():
        dst = dst_model.state_dict()
        for name, tensor in full_tensors(src_model):
            dst[name].copy_(tensor)


def print0(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


# -----------------------------------------------------------------------------
# Data


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


# -----------------------------------------------------------------------------
# Training


def train(cfg: TrainConfig, is_equivalent=None, on_step=None):
    """Runs cfg.stage from cfg.model on cfg.data; returns the last checkpoint folder.
    on_step(step, sampler_model): called on rank 0 after every RL step (the toy demo's plot)."""
    rank, world, device = setup_distributed() if not dist.is_initialized() else (dist.get_rank(), dist.get_world_size(), current_device())
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {world} ranks")
    torch.manual_seed(cfg.seed)
    tokenizer = chat.load_tokenizer(cfg.model)
    ids = chat.control_ids(tokenizer)
    policy = Transformer.from_pretrained(cfg.model, dtype=torch.float32, device=device)
    policy.gradient_checkpointing = cfg.grad_checkpointing
    vocab_size = chat.tokenizer_vocab_size(tokenizer, policy.config.vocab_size)
    if dist.is_initialized():  # FSDP2: bf16 compute on GPU, fp32 master weights (CPU: fp32 throughout)
        shard(policy, device)
    lr = cfg.stage_default("lr", 1e-5, 1e-6)
    # betas: (0.9, 0.95) in the warm-up recipe; THINKLESS.md gives none for RL, where verl's default holds
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, betas=(0.9, 0.95) if cfg.stage == "sft" else (0.9, 0.999),
                                  weight_decay=cfg.stage_default("weight_decay", 0.1, 0.01))

    if cfg.stage == "sft":
        pairs = sft.read_sft_jsonl(cfg.data)
        examples = [(chat.encode_prompt(tokenizer, q), tokenizer.encode(r, add_special_tokens=False).ids + [ids.eos])
                    for q, r in pairs]
        kept = [e for e in examples if len(e[0]) + len(e[1]) <= cfg.max_len]
        print0(f"sft: {len(kept)} pairs ({len(examples) - len(kept)} dropped over {cfg.max_len} tokens)")
        items = kept
        total_steps = cfg.steps or math.ceil(len(items) / cfg.batch_size)
    else:
        problems = evaluation.load_problems(cfg.data, skip_unanswered=True)
        items = [(chat.encode_prompt(tokenizer, p["problem"]), p["answer"], p.get("level")) for p in problems]
        items = [it for it in items if len(it[0]) <= cfg.max_prompt_len]
        # with a `level` on every problem, the metrics count think samples per level (degrpo.rollout_metrics)
        level_names = sorted({str(it[2]) for it in items}) if all(it[2] is not None for it in items) else []
        print0(f"rl: {len(items)} problems ({len(problems) - len(items)} skipped over {cfg.max_prompt_len} prompt tokens)")
        total_steps = cfg.steps or math.ceil(len(items) / cfg.batch_size)
        sample_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        sampler_model = Transformer.from_pretrained(cfg.model, dtype=sample_dtype, device=device).eval()
        ref_model = Transformer.from_pretrained(cfg.model, dtype=sample_dtype, device=device).eval() if cfg.beta else None
        alpha = cfg.alpha or "0.001"  # the official control-token weight
        rl_cfg = degrpo.RLConfig(
            group_size=cfg.group_size, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
            alpha=None if alpha.lower() == "none" else float(alpha), clip_eps=cfg.clip_eps, beta=cfg.beta,
            entropy_coef=cfg.entropy_coef, std_normalize=cfg.std_normalize, loss_agg=cfg.loss_agg,
            drop_equal_groups=cfg.drop_equal_groups, updates_per_rollout=cfg.updates_per_rollout,
            micro_batch_tokens=cfg.micro_batch_tokens, max_batch=cfg.max_batch, grad_clip=cfg.grad_clip)

        def reward_fn(tokens, answer):
            d = reward_details(chat.decode_response(tokenizer, tokens), answer, is_equivalent=is_equivalent)
            return score(d, correct_think=cfg.correct_think), {"mode": d.mode, "correct": d.correct,
                                                               "format_ok": d.format_ok}

    start = 0
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.resume and (ckpt := latest_checkpoint(cfg.out)):
        start = load_checkpoint(ckpt, policy, optimizer)["step"]
        print0(f"resumed from {ckpt} at step {start}")
        if cfg.stage == "rl":
            copy_weights(policy, sampler_model)
    metrics_file = os.path.join(cfg.out, "metrics.jsonl")
    if rank == 0 and os.path.exists(metrics_file):
        trim_metrics(metrics_file, start)
    t_start, t_print, last_ckpt = time.time(), 0.0, None
    for step in range(start, total_steps):
        mine, first = batch_indices(len(items), cfg.batch_size, step, cfg.seed, rank, world)
        if cfg.stage == "sft":
            lr_now = sft.cosine_lr(step, total_steps, lr, cfg.min_lr, cfg.warmup_frac)
            for g in optimizer.param_groups:
                g["lr"] = lr_now
            m = sft.sft_step(policy, optimizer, [items[i][0] for i in mine], [items[i][1] for i in mine],
                             cfg.micro_batch_tokens, cfg.grad_clip, world)
            line = f"loss {m['loss']:.4f} | grad {m['grad_norm']:.3f} | lr {lr_now:.2e}"
        else:
            m = degrpo.rl_step(policy, sampler_model, ref_model, optimizer, [items[i][0] for i in mine],
                               [items[i][1] for i in mine], reward_fn, rl_cfg, seed=cfg.seed * 1_000_003 + step,
                               eos_id=ids.eos, vocab_size=vocab_size, first_index=first, world_size=world,
                               levels=[str(items[i][2]) for i in mine] if level_names else None, level_names=level_names)
            copy_weights(policy, sampler_model)  # the next rollout samples from the new weights
            line = (f"reward {m['reward']:+.3f} | think {m['think']}/{m['samples']} acc {m['acc_think']:.2f} | "
                    f"short acc {m['acc_short']:.2f} | len {m['response_len']:.0f} | kl {m['kl']:.4f} | "
                    f"clip {m['clip_frac']:.3f} | grad {m['grad_norm']:.3f}")
        elapsed = time.time() - t_start
        if time.time() - t_print >= 2 or step + 1 == total_steps:  # every step, or every 2 s when steps are fast
            t_print = time.time()
            eta = elapsed / (step + 1 - start) * (total_steps - step - 1)
            print0(f"{cfg.stage} step {step + 1}/{total_steps} | {line} | {elapsed / (step + 1 - start):.2f}s/step | "
                   f"ETA {eta / 60:.1f}m")
        if rank == 0:
            with open(metrics_file, "a") as f:
                f.write(json.dumps({"stage": cfg.stage, "step": step + 1, **m}) + "\n")
        if on_step and cfg.stage == "rl" and rank == 0:
            on_step(step + 1, sampler_model)
        if (step + 1) % cfg.save_every == 0 or step + 1 == total_steps:
            state = {"step": step + 1, "stage": cfg.stage, "config": dataclasses.asdict(cfg)}
            last_ckpt = save_checkpoint(cfg.out, step + 1, policy, optimizer, tokenizer, state, cfg.keep_last)
            print0(f"saved {last_ckpt}")
    return last_ckpt or latest_checkpoint(cfg.out)


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.preset is not None:
        import toy

        toy.run_demo(cfg)
    else:
        train(cfg)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
