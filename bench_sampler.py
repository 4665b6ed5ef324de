"""
Benchmark of sampler.py: decode throughput against transformers' generate, and slot utilisation
with a long-tailed mix of response lengths, with and without refill.

  python bench_sampler.py                      # CPU: a small random model, fp32
  python bench_sampler.py --shape 1.5b --batch 64 --compile   # GPU: the real 1.5B shape in bf16

1. Throughput: the same random-weight model, batch and lengths in both samplers; prompts of one
   length (so transformers needs no padding), sampling at temperature 1 without top-k / top-p,
   no stop token (every row generates --new tokens). On a GPU the tokens/s is also set against the
   memory-bandwidth roofline: each decode step must read every weight once (the input embedding
   only in the rows it looks up, so it is not counted unless tied to the lm_head) and the KV of
   every live token, so tokens/s <= batch * bandwidth / (weight bytes + mean KV bytes per step),
   with the HBM bandwidth of the SXM parts' data sheets (H100 3.35 TB/s, H200 4.8 TB/s).
2. Utilisation = generated tokens / row-steps (rows decoded, summed over steps). Response lengths
   are forced (a logit bias on a stop id at chosen positions): 90% of the responses are --short
   tokens long, 10% are 10x that, shuffled. --sequences 0 skips it.
"""

import argparse
import os
import random
import statistics
import tempfile
import time

import torch

from model import ModelConfig, Transformer
from sampler import generate

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, head_dim, vocab
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=320),  # the test models' shape
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=32, vocab_size=4096),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, head_dim=128, vocab_size=151936),  # DeepSeek-R1-Distill-Qwen-1.5B
}
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s of HBM (SXM parts)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(shape, dtype, device, tmp):
    """A random transformers Qwen2 model and ours loaded from its checkpoint (the same weights)."""
    import transformers

    cfg = ModelConfig(**SHAPES[shape], max_position_embeddings=32768)
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg.to_hf())).to(dtype).eval()
    hf.generation_config.eos_token_id = None
    hf.save_pretrained(tmp)
    return hf, Transformer.from_pretrained(tmp, dtype=dtype, device=device)


def throughput(hf, ours, args, device):
    V = ours.config.vocab_size
    prompts = torch.randint(0, V, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    x = prompts.to(device)

    def run_hf():
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new, min_new_tokens=args.new,
                    do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)

    def run_ours():
        generate(ours, prompts.tolist(), args.new, temperature=1.0, seed=0, max_batch=args.batch, compile=args.compile)

    runs = {"transformers": run_hf, "sampler.py": run_ours}
    times = {name: [] for name in runs}
    for name, fn in runs.items():
        fn()  # warm-up (and compilation)
    for _ in range(args.repeat):  # alternated, so that a busy machine slows both alike
        for name, fn in runs.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    results = {}
    for name, ts in times.items():
        results[name] = args.batch * args.new / statistics.median(ts)
        print(f"{name:>13}: {results[name]:10.1f} tokens/s  (median of {args.repeat}: {statistics.median(ts):.3f} s for "
              f"{args.batch} x {args.new} new tokens after {args.prompt}-token prompts)")
    print(f"{'speedup':>13}: {results['sampler.py'] / results['transformers']:.2f}x")
    cfg = ours.config
    read = [p for n, p in ours.named_parameters() if n != "embed_tokens.weight" or cfg.tie_word_embeddings]
    weights = sum(p.numel() * p.element_size() for p in read)  # bytes read per step
    elem = ours.embed_tokens.weight.element_size()
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem  # k and v
    step_bytes = weights + args.batch * (args.prompt + args.new / 2) * kv_per_token
    name = torch.cuda.get_device_name() if device.type == "cuda" else "a CPU"
    bw = next((b for k, b in BANDWIDTH.items() if k in name), None)
    if bw:
        roof = args.batch * bw / step_bytes
        print(f"{'roofline':>13}: {roof:10.1f} tokens/s on {name} ({bw / 1e12:.2f} TB/s, {step_bytes / 1e9:.2f} GB "
              f"per step); sampler.py at {100 * results['sampler.py'] / roof:.0f}% of it")
    else:
        print(f"{'roofline':>13}: {step_bytes / 1e9:.3f} GB read per decode step; no HBM bandwidth known for {name} "
              f"(BANDWIDTH has {', '.join(BANDWIDTH)})")


def utilisation(ours, args, device):
    """Forces response lengths with a stop id: prompts of length P stop at position P + S - 2
    (S tokens), prompts of length P + S stop at P + S + 10 S - 2 (10 S tokens; they start past the
    first stop position, so they never see it)."""
    P, S, stop = args.prompt, args.short, 0
    stop_at = torch.tensor([P + S - 2, P + S + 10 * S - 2], device=device)

    class ForcedLengths(Transformer):
        def forward(self, idx, positions=None, **kw):
            logits = super().forward(idx, positions, **kw)
            if logits is not None:  # the prefill asks for no logits
                hit = torch.isin(positions, stop_at)  # (B, T)
                logits[..., stop] = torch.where(hit, 1e4, -1e4).to(logits.dtype)
            return logits

    ours.__class__ = ForcedLengths
    rng = random.Random(0)
    lengths = [10 * S if i % 10 == 0 else S for i in range(args.sequences)]
    rng.shuffle(lengths)
    V = ours.config.vocab_size
    prompts = [[rng.randrange(1, V) for _ in range(P if L == S else P + S)] for L in lengths]
    for refill in (False, True):
        stats = {}
        sync(device)
        t = time.perf_counter()
        out = generate(ours, prompts, 10 * S, temperature=1.0, stop_ids=[stop], seed=0, max_batch=args.batch,
                       refill=refill, compile=args.compile, stats=stats)
        sync(device)
        dt = time.perf_counter() - t
        assert [len(o[0].tokens) for o in out] == lengths, "forced lengths not obeyed"
        print(f"refill={refill!s:>5}: utilisation {100 * stats['tokens'] / stats['row_steps']:5.1f}% "
              f"({stats['tokens']} tokens / {stats['row_steps']} row-steps, {stats['steps']} steps), "
              f"{stats['tokens'] / dt:8.1f} tokens/s")
    ours.__class__ = Transformer


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new", type=int, default=128, help="new tokens per row (throughput)")
    p.add_argument("--short", type=int, default=16, help="short response length (utilisation); long = 10x")
    p.add_argument("--sequences", type=int, default=128, help="sequences in the utilisation mix (0: skip it)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU)")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    print({k: v for k, v in vars(args).items()}, f"dtype={dtype}, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}", torch.cuda.get_device_name() if device.type == "cuda" else "")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        hf, ours = build(args.shape, dtype, device, os.path.join(tmp, "model"))
        print("== throughput")
        throughput(hf, ours, args, device)
        del hf
        if args.sequences:
            print("== slot utilisation, long-tailed lengths")
            utilisation(ours, args, device)


if __name__ == "__main__":
    main()
