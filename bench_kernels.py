"""
Benchmark of logprob_kernels.fused_logprobs: peak memory and time of forward + backward, against
  naive     the full-logits path every trainer starts with: logits = h @ W^T in the model dtype,
            .float(), log_softmax, gather  ([N, V] several times over, and again in the backward)
  compiled  the same math chunked over tokens (1024 at a time), each chunk torch.compile'd and
            checkpointed, so only one chunk's [1024, V] logits live at a time
  fused     ours (Triton kernels on CUDA, the plain-torch chunk loop on CPU)
at V = 151936, H = 1536 (DeepSeek-R1-Distill-Qwen-1.5B's lm_head).

    python bench_kernels.py                              # CPU, small N
    python bench_kernels.py --n 4096 16384 32768         # on a GPU (H100/H200): the issue's sizes

Peak memory is the increase over what the inputs (hidden, weight, targets) already hold, gradients
included: torch.cuda.max_memory_allocated on GPU, the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs) on CPU, with glibc told to give every block of 64 KB or more back
to the system when freed, so the resident set follows the live tensors. Prints a markdown table
for BENCHMARKS.md.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from logprob_kernels import fused_logprobs


def naive_logprobs(hidden, weight, targets, temperature):
    logits = (hidden @ weight.t()).float() / temperature  # (N, V)
    return F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)  # (N,)


@torch.compile
def _chunk_logprobs(hidden, weight, targets, inv_temp):
    logits = (hidden @ weight.t()).float() * inv_temp  # (chunk, V)
    return F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def compiled_logprobs(hidden, weight, targets, temperature, chunk=1024):
    return torch.cat([checkpoint(_chunk_logprobs, hidden[i:i + chunk], weight, targets[i:i + chunk],
                                 1.0 / temperature, use_reentrant=False)
                      for i in range(0, hidden.shape[0], chunk)])


METHODS = {"naive": naive_logprobs, "compiled": compiled_logprobs, "fused": fused_logprobs}

# -----------------------------------------------------------------------------
# Measuring


def _rss_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def measure(fn, hidden, weight, targets, repeats):
    """(seconds per forward + backward, peak bytes above the inputs, the same less the gradients of
    hidden and weight (what the method itself needs), logp) of the last repeat."""
    cuda = hidden.is_cuda
    times = []
    for _ in range(repeats + 1):  # the first run warms up (and compiles); not timed
        hidden.grad = weight.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak resident set size to the current one
            base = _rss_bytes("VmRSS:")
        t0 = time.perf_counter()
        logp = fn(hidden, weight, targets, 1.0)
        logp.sum().backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() if cuda else _rss_bytes("VmHWM:")) - base
    working = peak - hidden.grad.nbytes - weight.grad.nbytes
    return statistics.median(times[1:]), peak, working, logp.detach()


def main():
    if not torch.cuda.is_available() and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc otherwise keeps freed blocks up to 32 MB for reuse, and the resident set lies.
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=None, help="token counts (default: 256 512 on CPU)")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    ns = args.n or [256, 512]
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, {dtype}, V = {args.vocab}, H = {args.hidden}, forward + backward, median of {args.repeats}\n")
    print("| N | method | time (s) | peak memory (MiB) | without grads (MiB) | vs naive: memory | vs naive: time "
          "| max abs diff logp vs naive |")
    print("|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden, device=device) * 0.02).to(dtype).requires_grad_()
    for n in ns:
        hidden = torch.randn(n, args.hidden, device=device).to(dtype).requires_grad_()
        targets = torch.randint(0, args.vocab, (n,), device=device)
        results = {}
        for method in args.methods:
            try:
                results[method] = measure(METHODS[method], hidden, weight, targets, args.repeats)
            except torch.OutOfMemoryError:
                results[method] = None
            if results[method] is None:
                print(f"| {n} | {method} | OOM | OOM | OOM | | | |")
                continue
            sec, peak, working, logp = results[method]
            naive = results.get("naive")
            rel = f"{peak / naive[1]:.3f}x | {sec / naive[0]:.2f}x" if naive else " | "
            diff = f"{(logp - naive[3]).abs().max().item():.2e}" if naive else ""
            print(f"| {n} | {method} | {sec:.3f} | {peak / 2**20:.0f} | {working / 2**20:.0f} | {rel} | {diff} |",
                  flush=True)
        del hidden, targets, results
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
