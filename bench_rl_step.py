"""
Benchmark of one RL step (issue 6): rollouts, update and the refresh of the sampler copy, timed
apart, on a random-weight model, through the code train.py runs (degrpo.rl_step, FSDP2 on a GPU).

    python bench_rl_step.py                                                        # CPU: small shape
    python bench_rl_step.py --shape 1.5b --prompts 16 --new 4096 [--compile]           # one GPU

A random model almost never writes its stop token, so every response runs to --new tokens: the
step's size is fixed (prompts x group x (prompt + new) tokens). The reward is a stub (+1 when the
first response token is even, -1 otherwise), so that the groups have nonzero advantages and the
update does its full work; scoring real answers is not what this measures.
"""

import argparse
import time

import torch

import degrpo
import train
from bench_sampler import SHAPES
from model import ModelConfig, Transformer
from sampler import new_cache


def stub_reward(tokens, answer):
    even = tokens[0] % 2 == 0
    return (1.0 if even else -1.0), {"mode": "short" if even else "think", "correct": even}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="small")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (the official run: 128 over all ranks)")
    p.add_argument("--group", type=int, default=8, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new", type=int, default=64, help="response tokens")
    p.add_argument("--micro-batch-tokens", type=int, default=32768)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="as train.py: on by default")
    p.add_argument("--compile", action="store_true", help="the sampler's decode step compiled (CUDA graphs)")
    p.add_argument("--steps", type=int, default=3, help="timed steps, after one untimed warm-up step")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="as train.py's --dtype (default: bfloat16 "
                                                 "on a GPU, float32 on a CPU)")
    args = p.parse_args()

    dtype = train.compute_dtype(args)
    rank, world, device = train.setup_distributed(group_of_one=dtype != torch.float32)
    cfg = ModelConfig(**SHAPES[args.shape], max_position_embeddings=args.prompt_len + args.new + 64, dtype="float32")
    torch.manual_seed(0)
    with torch.device(device):  # initialised where they live: a 1.5B init on one CPU core takes minutes
        policy = Transformer(cfg)
        sampler_model = Transformer(cfg).to(dtype).eval()
        ref_model = Transformer(cfg).to(dtype).eval()
    policy.gradient_checkpointing = args.grad_checkpointing
    train.copy_weights(policy, sampler_model)
    train.copy_weights(policy, ref_model)
    if train.dist.is_initialized():
        train.shard(policy, dtype)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.01)
    rl_cfg = degrpo.RLConfig(group_size=args.group, max_new_tokens=args.new, micro_batch_tokens=args.micro_batch_tokens,
                             max_batch=args.max_batch, compile=args.compile)
    cache = new_cache(sampler_model, min(args.max_batch, args.prompts * args.group), args.prompt_len, args.new)
    g = torch.Generator().manual_seed(rank)
    prompts = [torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    n_params = sum(p.numel() for p in sampler_model.parameters())
    train.print0(f"{args.shape} ({n_params / 1e6:.0f}M params), {device}, {world} rank(s): {args.prompts} prompts x "
                 f"{args.group} samples x ({args.prompt_len} + {args.new}) tokens per rank, "
                 f"micro-batch {args.micro_batch_tokens} tokens, grad checkpointing {args.grad_checkpointing}, "
                 f"compile {args.compile}, {dtype}")
    times = []
    for step in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        m = degrpo.rl_step(policy, sampler_model, ref_model, optimizer, prompts, [None] * len(prompts), stub_reward,
                           rl_cfg, seed=step, eos_id=0, vocab_size=cfg.vocab_size, first_index=rank * len(prompts),
                           world_size=world, cache=cache)
        t0 = time.time()
        train.copy_weights(policy, sampler_model)
        if device.type == "cuda":
            torch.cuda.synchronize()
        refresh = time.time() - t0
        tokens = args.prompts * args.group * m["response_len"]
        line = (f"rollout {m['rollout_time']:.2f} s ({tokens / m['rollout_time']:.0f} tokens/s) | update "
                f"{m['update_time']:.2f} s | refresh {refresh:.2f} s | response len {m['response_len']:.0f}")
        if device.type == "cuda":
            line += f" | peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        train.print0(("warm-up " if step == 0 else f"step {step}  ") + line)
        if step:
            times.append((m["rollout_time"], m["update_time"], refresh))
    median = [sorted(t)[len(t) // 2] for t in zip(*times)]
    train.print0(f"median of {args.steps}: rollout {median[0]:.2f} s, update {median[1]:.2f} s, refresh {median[2]:.2f} s, "
                 f"step {sum(median):.2f} s")
    if train.dist.is_initialized():
        train.dist.destroy_process_group()


if __name__ == "__main__":
    main()
