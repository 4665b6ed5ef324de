"""
The first real run, rehearsed on a CPU: random checkpoints with the exact shapes of Qwen2.5-0.5B and
Qwen3-0.6B and the real R1-Distill tokenizer, through every stage as a cluster runs them (torchrun,
2 gloo ranks, --dtype bfloat16), with the peak memory of each phase of each rank measured and set
against the memory plan of BENCHMARKS.md evaluated at the same shapes and batch.

    python rehearse.py                        # both shapes, 4 blocks each: 13 min on 2 cores, 10 GiB at most
    python rehearse.py --layers 0             # the full depth (24 and 28 blocks): ~20 GiB of memory
    python rehearse.py --plan 1.5b 7b         # the memory plan alone, at the official run's sizes on 4 GPUs

Per shape: make_random_checkpoint.py -> SFT, 2 steps -> RL, 2 steps, saved -> --resume, 1 more step ->
eval.py on 2 problems; then eval.py on 2 problems with a random checkpoint of the full depth (the
checkpoints, up to 10 GB a shape at 4 blocks, are deleted at the end; logs and measurements stay). Each
rank of each torchrun stage runs this file as a worker (--worker): train.main with the phases wrapped
(load, step, sample, update, refresh, save, resume load). A phase's peak is the process's peak
resident set (VmHWM, reset at the phase's start through /proc/self/clear_refs), minus its resident
set after imports (the baseline): on a CPU the weights, states, caches and activations the plan puts
in GPU memory are all in the resident set, with the Python heap and allocator slack around them.

Why 4 blocks by default: the trainer holds 16 bytes a parameter over all ranks (fp32 weights, gradients,
Adam's two moments) plus a bf16 sampler and reference copy per rank: 14 GB for Qwen3-0.6B on 2 ranks,
more than a machine that runs anything else has to spare. Every shape that is not the depth (the
151936-row vocabulary, tied embeddings, head_dim 128 beside a hidden size of 1024, q/k norms, GQA) is
the real one at any depth.
"""

import argparse
import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(ROOT, "..", "shared", "models", "deepseek-r1-distill-qwen-1.5b")
SFT_DATA = os.path.join(ROOT, "docs", "warmup_sample.jsonl")
RL_DATA = os.path.join(ROOT, "..", "shared", "data", "aime24.jsonl")

# The config.json of each model (their Hub files, the keys our model reads). Qwen3-0.6B's hidden size
# (1024) is not heads x head_dim (16 x 128 = 2048): its attention projects up and back down.
SHAPES = {
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, use_sliding_window=False, torch_dtype="bfloat16",
                         bos_token_id=151643, eos_token_id=151643),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, attention_bias=False, use_sliding_window=False,
                       torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151645),
    # the plan's other shapes (BENCHMARKS.md): the paper's model, and a 7B
    "1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                 num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=False),
    "7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
               num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}

# -----------------------------------------------------------------------------
# Measured: the peak resident set of each phase, in each rank


def status_kib(field):
    """A field of /proc/self/status in KiB: VmRSS (resident now) or VmHWM (the peak since the last reset)."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", open("/proc/self/status").read(), re.M).group(1))


def measured(name, fn, log, stage):
    """fn, its calls measured as phase `name`: a line in log with the resident set at the call's start
    and end, freed heap memory returned to the system first (malloc_trim: what remains is what is
    alive), and the peak in between (VmHWM after a reset: exact, not sampled), in bytes."""
    def wrapped(*args, **kwargs):
        start = resident()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        try:
            return fn(*args, **kwargs)
        finally:
            peak = status_kib("VmHWM") * 1024
            with open(log, "a") as f:
                f.write(json.dumps({"stage": stage, "phase": name, "start": start, "peak": peak, "end": resident()}) + "\n")
    return wrapped


def resident():
    """The resident set in bytes, once the C heap has returned what is free (glibc keeps freed blocks)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return status_kib("VmRSS") * 1024


def worker(log, argv):
    """A torchrun rank: train.main(argv) with its phases measured into log (a baseline line first)."""
    import degrpo
    import sft
    import train

    stage = argv[argv.index("--stage") + 1]
    with open(log, "a") as f:
        f.write(json.dumps({"stage": stage, "phase": "baseline", "start": resident()}) + "\n")
    for module, name, phase in ((sft, "sft_step", "step"), (degrpo, "sample_rollouts", "sample"),
                                (degrpo, "rl_update", "update"), (train, "copy_weights", "refresh"),
                                (train, "save_checkpoint", "save"), (train, "build_models", "load"),
                                (train, "load_checkpoint", "resume load")):
        setattr(module, name, measured(phase, getattr(module, name), log, stage))
    for module in (sft, degrpo):  # the tokens of each training micro-batch: the plan's activations
        module.token_logprobs = counted(module.token_logprobs, log)
    train.main(argv)


def counted(token_logprobs, log):
    """token_logprobs, the tokens (rows x longest row) of each training forward logged."""
    def wrapped(model, idx, *args, **kwargs):
        if model.training:
            with open(log, "a") as f:
                f.write(json.dumps({"phase": "micro-batch", "tokens": idx.numel()}) + "\n")
        return token_logprobs(model, idx, *args, **kwargs)
    return wrapped


# -----------------------------------------------------------------------------
# Planned: BENCHMARKS.md's memory plan as arithmetic


def model_config(shape, layers=None):
    from model import ModelConfig

    cfg = ModelConfig.from_hf(SHAPES[shape], source=shape)
    return dataclasses.replace(cfg, num_hidden_layers=layers or cfg.num_hidden_layers)


def n_params(cfg):
    """(all parameters, the root's: embedding, final norm, and the lm_head when untied), counted on the meta device."""
    import torch

    from model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    return total, total - sum(p.numel() for p in model.layers.parameters())


def saved_bytes_per_token_per_block(cfg, checkpointing, T=64):
    """Bytes a training forward keeps for backward per token and per block (the tensors' storages,
    weights excluded), in cfg.dtype: the saving of a model of two blocks minus that of one."""
    import torch

    from model import Transformer

    saved = []
    for layers in (1, 2):
        torch.manual_seed(0)
        model = Transformer(dataclasses.replace(cfg, num_hidden_layers=layers)).to(getattr(torch, cfg.dtype)).train()
        model.gradient_checkpointing = checkpointing  # as train.py sets it from --grad-checkpointing
        weights, storages = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}

        def keep(t):
            if t.untyped_storage().data_ptr() not in weights:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model(torch.randint(0, cfg.vocab_size, (1, T)), head=lambda h, w: h.sum())
        saved.append(sum(storages.values()))
    return (saved[1] - saved[0]) / T


def plan(cfg, world, rows, slots, tokens, beta=True, act_bytes=None, gpu=False):
    """BENCHMARKS.md's memory plan at cfg's shapes: per rank, {(stage, phase): {term: bytes}}. rows x
    slots: the sampler's KV cache; tokens: the largest training micro-batch (rows x longest row);
    act_bytes: bytes a block keeps for backward per token without checkpointing (default: measured at
    cfg's shape in bf16); gpu: the fused kernel's GPU chunks (else the CPU's). bf16 compute, fp32
    master weights, gradient checkpointing on. The update adds up terms that peak at different
    moments (the root's fp32 gradients at the end of the backward, the blocks' activations before):
    an upper bound."""
    from logprob_kernels.logprobs import CHUNKS

    P, R = n_params(cfg)  # all parameters, and the root's (embedding, final norm, untied lm_head)
    chunk_tokens, chunk_vocab = CHUNKS["triton" if gpu else "torch"]  # logits chunks: bf16 on a GPU, fp32 on a CPU
    V, H, L = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers
    if act_bytes is None:
        act_bytes = saved_bytes_per_token_per_block(dataclasses.replace(cfg, vocab_size=64, dtype="bfloat16"), False)
    states = {"fp32 weights, sharded": 4 * P / world, "Adam m and v, sharded": 8 * P / world}
    copies = {"sampler copy, bf16": 2 * P, **({"reference copy, bf16": 2 * P} if beta else {}),
              "KV cache": L * 2 * cfg.num_key_value_heads * cfg.head_dim * 2 * rows * slots}
    training = {"fp32 gradients, sharded": 4 * P / world, "root gathered, bf16": 2 * R,
                "root gradients: bf16, and fp32 for the reduce-scatter": (2 + 4) * R,
                "activations: block inputs + one block recomputed": tokens * (L * 2 * H + act_bytes),
                "fused log-probs: logits chunks + [vocab chunk, H] accumulator":
                    3 * chunk_tokens * chunk_vocab * (2 if gpu else 4) + chunk_vocab * H * 4}
    # one tensor at a time, at most the embedding, cast to bf16 first: the shard cast, the gathered
    # shards and their concatenation (gloo; NCCL gathers into one buffer)
    gathered = {"one tensor gathered in bf16": 2 * V * H / world + 2 * 2 * V * H}
    host = {"rank 0: the bf16 weights of the checkpoint, in host memory": 2 * P}
    return {("sft", "step"): {**states, **training},
            ("sft", "save"): {**states, **gathered, **host},
            ("rl", "sample"): {**states, **copies},
            ("rl", "update"): {**states, **copies, **training},
            ("rl", "refresh"): {**states, **copies, **gathered},
            ("rl", "save"): {**states, **copies, **gathered, **host}}


# -----------------------------------------------------------------------------
# The rehearsal


def sh(command, log):
    """Runs command (a list), its output appended to log; stops the rehearsal when it fails."""
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(command) + "\n")
        f.flush()
        # MALLOC_MMAP_THRESHOLD_ fixed: glibc otherwise raises its threshold (up to 32 MiB) after a large
        # block is freed, so a block's ~30 MB buffers (FSDP2's all-gather and reduce-scatter outputs) come
        # from the heap, and the holes they leave stay resident until malloc_trim: the update's peak then
        # counted 30-35 MiB a block that no tensor held (BENCHMARKS.md). Fixed at 128 KiB, every larger
        # tensor is its own mapping, returned when freed, and the peak measures what the plan counts.
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", MALLOC_MMAP_THRESHOLD_="131072")
        status = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
    if status:
        sys.exit(f"failed ({status}): {' '.join(command)}; its output: {log}")
    return time.time() - t0


def stage(args, memlog, log):
    """train.py under torchrun, 2 ranks, each measured into memlog.rankN.jsonl."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", __file__, "--worker", memlog, "--"]
    return sh(command + [str(a) for a in args], log)


def rehearse(shape, layers, out):
    """One shape end to end in out/shape (started over); returns {step: seconds} and the measured phases per rank."""
    d = os.path.join(out, shape)
    shutil.rmtree(d, ignore_errors=True)  # a run folder holds one run (train.py refuses a used --out)
    os.makedirs(d)
    log, memlog, times = os.path.join(d, "log.txt"), os.path.join(d, "memory"), {}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(SHAPES[shape], f, indent=2)
    base, sft_out, rl_out = (os.path.join(d, x) for x in ("base", "sft", "rl"))
    times["random checkpoint"] = sh([sys.executable, "make_random_checkpoint.py", "--config", f.name, "--tokenizer",
                                     TOKENIZER, "--out", base, "--dtype", "bfloat16"]
                                    + (["--layers", str(layers)] if layers else []), log)
    common = ["--dtype", "bfloat16", "--save-every", 1, "--keep-last", 1]  # a checkpoint of 4 blocks: 2.8 GB
    times["sft, 2 steps"] = stage(["--stage", "sft", "--model", base, "--data", SFT_DATA, "--out", sft_out,
                                   "--steps", 2, "--batch-size", 4] + common, memlog, log)
    rl = ["--stage", "rl", "--model", os.path.join(sft_out, "step_000002"), "--data", RL_DATA, "--out", rl_out,
          "--batch-size", 4, "--group-size", 4, "--max-new-tokens", 64] + common
    times["rl, 2 steps"] = stage(rl + ["--steps", 2], memlog, log)
    times["rl --resume, 1 more step"] = stage(rl + ["--steps", 3, "--resume"], memlog, log)
    evaluate = [sys.executable, "eval.py", "--data", RL_DATA, "--limit", "2", "--samples", "1", "--max-new-tokens",
                "64", "--dtype", "bfloat16"]
    times["eval, 2 problems"] = sh(evaluate + ["--model", os.path.join(rl_out, "step_000003"),
                                               "--out-dir", os.path.join(d, "eval")], log)
    if layers:  # the sampler and eval.py at the full depth too (inference only: it fits)
        full = os.path.join(d, "base_full_depth")
        sh([sys.executable, "make_random_checkpoint.py", "--config", f.name, "--tokenizer", TOKENIZER, "--out", full,
            "--dtype", "bfloat16"], log)
        times["eval at the full depth, 2 problems"] = sh(evaluate + ["--model", full, "--out-dir",
                                                                     os.path.join(d, "eval_full_depth")], log)
    for folder in [base, os.path.join(d, "base_full_depth")] + glob.glob(os.path.join(d, "*", "step_*")):
        shutil.rmtree(folder, ignore_errors=True)  # the checkpoints (GBs); the logs and measurements stay
    return times, {r: read_phases(f"{memlog}.rank{r}.jsonl") for r in (0, 1)}


def read_phases(path):
    """{(stage, phase): the largest peak over its calls, minus the rank's baseline}, and the largest
    training micro-batch in tokens, of one rank."""
    peaks, baseline, tokens = {}, None, 0
    for line in open(path):
        m = json.loads(line)
        if m["phase"] == "baseline":
            baseline = m["start"]
        elif m["phase"] == "micro-batch":
            tokens = max(tokens, m["tokens"])
        else:
            key = (m["stage"], m["phase"])
            peaks[key] = max(peaks.get(key, 0), m["peak"] - baseline)
    return peaks, tokens


def table(shape, layers, measured_peaks, tokens):
    """The markdown rows: phase, rank, measured, planned, their ratio."""
    cfg = model_config(shape, layers)
    # the KV cache: 2 prompts x 4 samples a rank, --max-prompt-len 1024 (the default) + --max-new-tokens 64 - 1 slots
    planned, rows = plan(cfg, world=2, rows=2 * 4, slots=1024 + 64 - 1, tokens=tokens), []
    for (stage_name, phase), terms in planned.items():
        for rank in (0, 1):
            total = sum(v for k, v in terms.items() if rank == 0 or not k.startswith("rank 0"))
            got = measured_peaks[rank].get((stage_name, phase))
            rows.append(f"| {shape}, {cfg.num_hidden_layers} blocks | {stage_name} {phase} | {rank} | {gib(got)} | "
                        f"{gib(total)} | {got / total:.2f} | {(got - total) / 2**30:+.2f} |")
    return rows


def gib(x):
    return f"{x / 2**30:.2f} GiB"


def print_plan(shapes):
    """The plan's terms at the official run's sizes on 4 GPUs: 64 rows x 25,599 slots of KV cache, 32k-token micro-batches."""
    for shape in shapes:
        cfg = model_config(shape)
        print(f"== {shape}: {n_params(cfg)[0] / 1e9:.2f} B parameters, 4 ranks, per rank")
        for (stage_name, phase), terms in plan(cfg, world=4, rows=64, slots=1024 + 24576 - 1, tokens=32768,
                                               gpu=True).items():
            print(f"{stage_name} {phase}: {sum(terms.values()) / 1e9:.1f} GB")
            for term, size in terms.items():
                print(f"    {term}: {size / 1e9:.2f} GB")


def main():
    if "--worker" in sys.argv:  # a rank of a stage: rehearse.py --worker MEMLOG -- train.py's flags
        i = sys.argv.index("--worker")
        return worker(f"{sys.argv[i + 1]}.rank{os.environ['RANK']}.jsonl", sys.argv[sys.argv.index("--") + 1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b", "qwen3-0.6b"], choices=list(SHAPES)[:2])
    ap.add_argument("--layers", type=int, default=4, help="blocks of the trained models (0: the full depth)")
    ap.add_argument("--out", default="runs/rehearsal")
    ap.add_argument("--plan", nargs="+", choices=list(SHAPES), help="print the memory plan of these shapes and stop")
    args = ap.parse_args()
    if not args.plan and not os.path.isfile(os.path.join(TOKENIZER, "tokenizer.json")):
        ap.error(f"the real tokenizer: no tokenizer.json in {TOKENIZER}")
    if args.plan:
        return print_plan(args.plan)
    for shape in args.shapes:
        t0 = time.time()
        times, phases = rehearse(shape, args.layers, args.out)
        print(f"== {shape}: {time.time() - t0:.0f} s")
        for name, seconds in times.items():
            print(f"  {name}: {seconds:.0f} s")
        print("| shape | phase | rank | measured | planned | measured / planned | difference (GiB) |")
        print("\n".join(table(shape, args.layers, {r: p for r, (p, _) in phases.items()}, max(t for _, t in phases.values()))))


if __name__ == "__main__":
    main()
