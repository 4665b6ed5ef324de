"""
The entry point: `python train.py` runs the toy demo on a CPU; `torchrun --nproc_per_node=4
train.py --stage sft|rl --model DIR --data FILE ...` runs a stage of Thinkless for real.

Defaults are the official hyperparameters for DeepSeek-R1-Distill-Qwen-1.5B (THINKLESS.md
sections 3 and 4); flags that default to None take the stage's official value.

Distributed layout (torch.distributed, gloo on CPU, NCCL on GPU):
  - The trained model is sharded with FSDP2 (`fully_shard` on every block, then the root), fp32
    master weights and fp32 gradient reduction, compute in --dtype, so one script scales from one
    GPU to several and to a 7B model.
  - Each rank takes a contiguous slice of the global batch (data.py). Losses are normalised by counts
    summed over all ranks (sft.py, degrpo.py), so N ranks compute the same step as one rank, on one
    node or several (torchrun --nnodes; --out on a filesystem they share: checked at the start).
  - RL samples from an unsharded copy of the current weights (in --dtype), refreshed after every
    update: gathering sharded weights at every decode step would make rollouts crawl. Its KV cache
    is allocated once, for --max-prompt-len + --max-new-tokens, and reused by every rollout. Ranks
    sample on their own and meet after it: collectives wait up to --dist-timeout-h for the slowest.
--dtype is the one precision setting: FSDP2's compute dtype, the sampler and reference copies and
the saved Hugging Face weights. bfloat16 by default on a GPU, float32 on a CPU; a CPU run can ask
for bfloat16 (a process group of one without torchrun: the bf16 compute is FSDP2's), which is how
the tests exercise the GPU's precision path.
Checkpoints (checkpoint.py): out/step_NNNNNN/ is a Hugging Face folder that transformers and
eval.py load, plus the sharded trainer state, written atomically. The data order and the sampling
seeds derive from (seed, step), so --resume continues exactly; it refuses flags that would not
(checkpoint.claim_run_folder), and a new run refuses a folder another run used. Mistakes in the
command are reported in one line before any model loads. On SIGTERM or SIGINT (a scheduler's time
limit) every rank finishes its step, a checkpoint is saved, and the run exits with status
checkpoint.PREEMPTED (75), saying how to continue. metrics.jsonl, curves.png and --wandb: curves.py.
The toy demo's driver is in toy.py.
"""

import argparse
import contextlib
import dataclasses
import datetime
import gc
import math
import os
import socket
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import chat
import curves
import degrpo
import sft
import toy
from checkpoint import (PREEMPTED, Preempted, RunError, agree, check_shared_folder, claim_run_folder, current_device,
                        full_tensors, latest_checkpoint, load_checkpoint, save_checkpoint, stop_on_signals,
                        stop_requested, trim_metrics)
from curves import progress
from data import batch_indices, load_items
from model import Transformer, load_config
from rewards import reward_details, score
from sampler import new_cache

# Memory freed between rollouts and training is reused by either without fragmenting: the caching
# allocator grows segments in place instead of keeping blocks of each size (read when CUDA starts).
if not os.environ.get("PYTORCH_ALLOC_CONF", os.environ.get("PYTORCH_CUDA_ALLOC_CONF")):  # the user's setting wins
    os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"

# -----------------------------------------------------------------------------
# Config


def arg(default, help):  # a config field and its --help text
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    preset: str | None = arg(None, "toy (the default without --model) or long: the CPU demo end to end (toy.PRESETS)")
    stage: str = arg("rl", "sft (warm-up distillation) or rl (DeGRPO)")
    model: str | None = arg(None, "checkpoint to start from: a Hugging Face folder, or a Hub id such as "
                        "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (downloaded when no such folder exists)")
    data: str | None = arg(None, "sft: JSONL {prompt, response}; rl: JSONL {problem, answer}")
    out: str = arg("runs/thinkless", "checkpoints and metrics.jsonl go here; a folder that holds another run's is "
                   "refused without --resume")
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
    grad_checkpointing: bool = arg(True, "recompute blocks in backward: 1.5B in bf16 keeps 3 kB a token per block "
                                         "instead of 104 kB (95 GB at 32k tokens without it); off for the toy")
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
    dtype: str | None = arg(None, "bfloat16 or float32: FSDP2's compute, the sampler and reference copies, the saved "
                                  "weights (master weights stay float32); default bfloat16 on a GPU, float32 on a CPU")
    compile: bool = arg(False, "rl: torch.compile the sampler's decode step, with CUDA graphs (for a GPU)")
    dist_timeout_h: float = arg(3.0, "hours a rank waits in a collective: ranks sample on their own and meet after "
                                     "the rollout, which can end ~25 min apart at 24k-token responses")
    save_every: int = 50
    keep_last: int = 3
    wandb: str | None = arg(None, "also log every step's metrics to this Weights & Biases project (pip install wandb; "
                            "metrics.jsonl and curves.png are written either way)")
    resume: bool = arg(False, "continue from the newest checkpoint in --out (none there: an error); every flag must "
                       "be the saved run's except those in checkpoint.RESUMABLE_CHANGES (--correct-think, --steps for "
                       "rl, --save-every, ... : each with the reason it is safe)")
    seed: int = 0

    def stage_default(self, name, sft_value, rl_value):
        value = getattr(self, name)
        return value if value is not None else (sft_value if self.stage == "sft" else rl_value)


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:  # --x and --no-x
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata.get("help", " "))
        else:
            kind = {int: int, float: float}.get(f.type) or {"int | None": int, "float | None": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata.get("help", " "))
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    if cfg.stage not in ("sft", "rl"):
        parser.error(f"--stage must be sft or rl, got {cfg.stage!r}")
    if cfg.preset is None and cfg.model is None:
        cfg.preset = "toy"
    if cfg.preset is not None:  # the toy sets these itself: a flag that would be ignored is refused
        if cfg.preset not in toy.PRESETS:
            parser.error(f"--preset must be one of {', '.join(toy.PRESETS)}, got {cfg.preset!r}")
        fixed = {"stage", "model", "data"} | set(toy.PRESETS[cfg.preset].sft) | set(toy.PRESETS[cfg.preset].rl)
        ignored = sorted(f"--{name.replace('_', '-')}" for name in fixed if getattr(cfg, name) != getattr(TrainConfig(), name))
        if ignored:
            parser.error(f"the toy demo sets {', '.join(ignored)} itself (toy.py); give --model and --data to run a stage")
        if cfg.resume:
            parser.error("the toy demo starts from scratch on every run (toy.DEMO_OUTPUTS); --resume is for --model runs")
    if cfg.preset is None and cfg.data is None:
        parser.error("--data is required with --model")
    for name in ("keep_last", "save_every", "batch_size", "group_size", "micro_batch_tokens", "max_batch"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.dtype not in (None, "bfloat16", "float32"):
        parser.error(f"--dtype must be bfloat16 or float32, got {cfg.dtype!r}")
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


def compute_dtype(cfg):
    """--dtype as a torch dtype: bfloat16 on a GPU and float32 on a CPU unless asked otherwise."""
    return getattr(torch, cfg.dtype or ("bfloat16" if torch.cuda.is_available() else "float32"))


def setup_distributed(group_of_one=False, timeout_h=3.0):
    """(rank, world_size, device); initialises the process group under torchrun. Without torchrun:
    a group of one on a GPU, so that one GPU runs the sharded path of N GPUs, and on a CPU when
    group_of_one is asked (bf16 compute is FSDP2's mixed precision); else no group (CPU, fp32).
    timeout_h: how long a collective waits for the slowest rank before the job is aborted."""
    if "RANK" not in os.environ:
        if not (torch.cuda.is_available() or group_of_one):
            return 0, 1, torch.device("cpu")
        with socket.socket() as s:  # a free port for the group's rendezvous
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="localhost", MASTER_PORT=str(port))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(hours=timeout_h)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return rank, world, device


def shard(model, dtype):
    """FSDP2: every block a unit, then the root (embeddings, final norm, lm_head). Forward and
    backward run in `dtype` (the fp32 weight shards are cast, then all-gathered in that dtype);
    gradients are reduce-scattered in fp32 into fp32 shards. gloo has bf16 all-gathers (and fp32
    reduce-scatters), so the CPU tests run this bf16 path as NCCL does."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def copy_weights(src_model, dst_model):
    """Refreshes the unsharded sampler copy from the trained (sharded) model."""
    with torch.no_grad():
        dst = dst_model.state_dict()
        for name, tensor in full_tensors(src_model, dst_model.embed_tokens.weight.dtype):  # in the copy's dtype
            dst[name].copy_(tensor)


def print0(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


# -----------------------------------------------------------------------------
# Training


@dataclass
class Run:
    """What a stage's step loop needs: the inputs (read_inputs, cheap: read before any model loads),
    then the models, the optimizer and the sampler's cache (build_models)."""
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    model_dir: str
    tokenizer: object
    ids: chat.ControlIds
    vocab_size: int  # the tokenizer's ids: the rows the sampler draws from
    items: list
    level_names: list  # rl, when every problem has a `level`: the metrics count each mode per level
    total_steps: int
    policy: Transformer | None = None
    optimizer: torch.optim.Optimizer | None = None  # its defaults["lr"]: the peak lr
    sampler_model: Transformer | None = None  # rl: the unsharded copy that samples
    ref_model: Transformer | None = None  # rl: the frozen reference of the KL term (None: --beta 0)
    rl_cfg: degrpo.RLConfig | None = None
    cache: object = None  # rl: the sampler's KV cache, allocated once
    reward_fn: object = None
    log: curves.RunLog | None = None


def read_inputs(cfg: TrainConfig, rank, world, device, dtype) -> Run:
    """The tokenizer, the model's config and the data: a mistake in them (checkpoint.RunError) is found
    before the minutes of loading a 7B model."""
    try:
        curves.check_wandb(cfg.wandb)
        model_dir = chat.resolve_model(cfg.model)
        tokenizer = chat.load_tokenizer(model_dir)
        ids = chat.control_ids(tokenizer)
        if cfg.stage == "rl" and (prefill := chat.prefilled_mode(model_dir)):
            raise ValueError(f"{cfg.model}: its chat template ends the generation prompt with {prefill!r}; RL needs the "
                             f"model to choose the first token (<think> or <short>), so the template must not pre-fill "
                             f"a mode (start RL from a warm-up checkpoint, or remove the control token from the template)")
        vocab_size = chat.tokenizer_vocab_size(tokenizer, load_config(model_dir).vocab_size)
        items, counted = load_items(cfg, tokenizer, ids.eos, model_dir)
        print0(counted)
    except (OSError, ValueError) as e:  # the messages name the file (and line); open() names it as filename
        raise RunError(f"{e.filename}: {e.strerror}" if getattr(e, "filename", None) else str(e)) from None
    levelled = cfg.stage == "rl" and all(it[2] is not None for it in items)
    return Run(cfg, rank, world, device, dtype, model_dir, tokenizer, ids, vocab_size, items,
               level_names=sorted({str(it[2]) for it in items}) if levelled else [],
               total_steps=cfg.steps or math.ceil(len(items) / cfg.batch_size))


def build_models(run: Run, is_equivalent=None):
    """The trained model (sharded), its optimizer, and for RL the sampler and reference copies, the
    sampler's KV cache and the reward function."""
    cfg, device = run.cfg, run.device
    torch.manual_seed(cfg.seed)
    run.policy = Transformer.from_pretrained(run.model_dir, dtype=torch.float32, device=device)
    run.policy.gradient_checkpointing = cfg.grad_checkpointing
    if dist.is_initialized():  # FSDP2: compute in dtype, fp32 master weights (no group: fp32 throughout)
        shard(run.policy, run.dtype)
    # betas (0.9, 0.95) in both stages: the warm-up recipe's, and the official RL actor's default
    run.optimizer = torch.optim.AdamW(run.policy.parameters(), lr=cfg.stage_default("lr", 1e-5, 1e-6), betas=(0.9, 0.95),
                                      weight_decay=cfg.stage_default("weight_decay", 0.1, 0.01))
    if cfg.stage == "sft":
        return
    run.sampler_model = Transformer.from_pretrained(run.model_dir, dtype=run.dtype, device=device).eval()
    run.ref_model = Transformer.from_pretrained(run.model_dir, dtype=run.dtype, device=device).eval() if cfg.beta else None
    alpha = cfg.alpha or "0.001"  # the official control-token weight
    run.rl_cfg = degrpo.RLConfig(
        group_size=cfg.group_size, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
        alpha=None if alpha.lower() == "none" else float(alpha), clip_eps=cfg.clip_eps, beta=cfg.beta,
        entropy_coef=cfg.entropy_coef, std_normalize=cfg.std_normalize, loss_agg=cfg.loss_agg,
        drop_equal_groups=cfg.drop_equal_groups, updates_per_rollout=cfg.updates_per_rollout,
        micro_batch_tokens=cfg.micro_batch_tokens, max_batch=cfg.max_batch, grad_clip=cfg.grad_clip,
        compile=cfg.compile)
    # One KV cache for the run, for the longest prompt and response: reused by every rollout, it is
    # never freed for training to break up (expandable_segments, set above, fights the rest).
    run.cache = new_cache(run.sampler_model, min(cfg.max_batch, cfg.batch_size // run.world * cfg.group_size),
                          cfg.max_prompt_len, cfg.max_new_tokens)

    tokenizer = run.tokenizer  # not `run`: a cycle would keep the models alive (train, at its end)

    def reward_fn(tokens, answer):
        d = reward_details(chat.decode_response(tokenizer, tokens), answer, is_equivalent=is_equivalent)
        return score(d, correct_think=cfg.correct_think), {"mode": d.mode, "correct": d.correct, "format_ok": d.format_ok}

    run.reward_fn = reward_fn


def run_step(run: Run, step):
    """One optimizer step (sft) or rollout batch (rl) on this rank's slice of the global batch: its metrics."""
    cfg, items = run.cfg, run.items
    t0 = time.time()
    mine, first = batch_indices(len(items), cfg.batch_size, step, cfg.seed, run.rank, run.world)
    if cfg.stage == "sft":
        lr_now = sft.cosine_lr(step, run.total_steps, run.optimizer.defaults["lr"], cfg.min_lr, cfg.warmup_frac)
        for g in run.optimizer.param_groups:
            g["lr"] = lr_now
        m = sft.sft_step(run.policy, run.optimizer, [items[i][0] for i in mine], [items[i][1] for i in mine],
                         cfg.micro_batch_tokens, cfg.grad_clip, run.world)
        m["lr"] = lr_now
    else:
        m = degrpo.rl_step(run.policy, run.sampler_model, run.ref_model, run.optimizer, [items[i][0] for i in mine],
                           [items[i][1] for i in mine], run.reward_fn, run.rl_cfg, seed=cfg.seed * 1_000_003 + step,
                           eos_id=run.ids.eos, vocab_size=run.vocab_size, first_index=first, world_size=run.world,
                           cache=run.cache, levels=[str(items[i][2]) for i in mine] if run.level_names else None,
                           level_names=run.level_names)
        copy_weights(run.policy, run.sampler_model)  # the next rollout samples from the new weights
    m["step_time"] = time.time() - t0
    return m


def save(run: Run, step):
    """out/step_NNNNNN (checkpoint.save_checkpoint), then curves.png from the metrics so far. Every
    checkpoint carries the run's prompt format as its template: SFT trains our format; RL prompts as the
    starting checkpoint's template does (the released warm-up model: a newline after <｜Assistant｜>),
    so RL sees the prompts its warm-up and its evaluation use."""
    cfg = run.cfg
    state = {"step": step, "stage": cfg.stage, "config": dataclasses.asdict(cfg)}
    template = chat.CHAT_TEMPLATE if cfg.stage == "sft" else chat.chat_template(run.model_dir)
    path = save_checkpoint(cfg.out, step, run.policy, run.optimizer, run.tokenizer, state, cfg.keep_last, run.dtype,
                           chat_template=template, start_dir=run.model_dir)
    print0(f"saved {path}")
    run.log.draw()
    return path


def setup(cfg: TrainConfig, is_equivalent=None):
    """The process group, the run folder (checkpoint.claim_run_folder), the inputs, the models, and the
    checkpoint resumed from; a mistake any rank finds stops every rank here. Returns (run, first step)."""
    dtype = compute_dtype(cfg)
    rank, world, device = (setup_distributed(dtype != torch.float32, cfg.dist_timeout_h) if not dist.is_initialized() else
                           (dist.get_rank(), dist.get_world_size(), current_device()))
    check_shared_folder(cfg.out)
    run, error = None, None
    try:
        if cfg.batch_size % world:
            raise RunError(f"--batch-size {cfg.batch_size} is not divisible by the {world} ranks")
        resume_from, notes = claim_run_folder(cfg.out, cfg.resume, dataclasses.asdict(cfg),
                                              dataclasses.asdict(TrainConfig()))
        run = read_inputs(cfg, rank, world, device, dtype)
        run.log = curves.RunLog(cfg.out, rank == 0, cfg.wandb, dataclasses.asdict(cfg), resume=bool(resume_from))
    except (RunError, ValueError) as e:  # ValueError: wandb could not start (curves.start_wandb)
        error = RunError(str(e))
    agree(error)
    build_models(run, is_equivalent)
    start = 0
    os.makedirs(cfg.out, exist_ok=True)
    if resume_from:
        start = load_checkpoint(resume_from, run.policy, run.optimizer)["step"]
        print0(f"resumed from {resume_from} at step {start}")
        for note in notes:
            print0(note)
        if cfg.stage == "rl":
            copy_weights(run.policy, run.sampler_model)
    if rank == 0 and os.path.exists(os.path.join(cfg.out, "metrics.jsonl")):
        trim_metrics(os.path.join(cfg.out, "metrics.jsonl"), start)
    return run, start


def train(cfg: TrainConfig, is_equivalent=None, on_step=None):
    """Runs cfg.stage from cfg.model on cfg.data; returns the last checkpoint folder.
    on_step(step, sampler_model): called on rank 0 after every RL step (the toy demo's plot).
    A mistake in the command (checkpoint.RunError) is found before any model is loaded. After a signal
    (checkpoint.stop_on_signals) every rank finishes the step, saves, and raises checkpoint.Preempted."""
    run, start = setup(cfg, is_equivalent)
    t_start, t_print, last_ckpt = time.time(), 0.0, None
    try:
        for step in range(start, run.total_steps):
            m = run_step(run, step)
            elapsed = time.time() - t_start
            if time.time() - t_print >= 2 or step + 1 == run.total_steps:  # every step, or every 2 s when fast
                t_print = time.time()
                eta = elapsed / (step + 1 - start) * (run.total_steps - step - 1)
                print0(f"{cfg.stage} step {step + 1}/{run.total_steps} | {progress(cfg.stage, m)} | "
                       f"{elapsed / (step + 1 - start):.2f}s/step | ETA {eta / 60:.1f}m")
            run.log.log({"stage": cfg.stage, "step": step + 1, **m})
            if on_step and cfg.stage == "rl" and run.rank == 0:
                on_step(step + 1, run.sampler_model)
            saved = (step + 1) % cfg.save_every == 0 or step + 1 == run.total_steps
            if saved:
                last_ckpt = save(run, step + 1)
            if (signal_name := stop_requested(run.device)) and step + 1 < run.total_steps:
                path = last_ckpt if saved else save(run, step + 1)
                raise Preempted(f"stopped by {signal_name} after step {step + 1}/{run.total_steps}, saved in {path}: "
                                f"to continue, run the same command with --resume")
    finally:  # the models freed now, not at the interpreter's exit: a sharded model holds the process group,
        run.log.close()  # and gloo's threads abort a process whose group is destroyed at its exit
        del run
        gc.collect()  # cycles (an exception's frames, a closure) would keep them until then
    return last_ckpt or latest_checkpoint(cfg.out)


def main(argv=None):
    cfg = parse_args(argv)
    status = 0
    # a real run stops cleanly on SIGTERM or SIGINT (the toy demo starts over anyway), until its group is gone
    with stop_on_signals(announce=os.environ.get("RANK", "0") == "0") if cfg.preset is None else contextlib.nullcontext():
        try:
            if cfg.preset is not None:
                toy.run_demo(cfg, train)
            else:
                train(cfg)
        except RunError as e:  # a mistake in the command: one line (rank 0), no traceback, status 1 on every rank
            print0(f"error: {e}")
            status = 1
        except Preempted as e:  # saved: one line (rank 0) saying how to continue, status PREEMPTED on every rank
            print0(str(e))
            status = PREEMPTED
        gc.collect()  # a stopped or failed run's models (its exception's frames held them), before their group
        if dist.is_initialized():
            dist.destroy_process_group()
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
