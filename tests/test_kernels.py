"""logprob_kernels/: fused log-probs and entropy (torch path and Triton kernels) against the full-logits reference
in fp64. Triton runs through its interpreter on CPU tensors (no GPU), compiled on CUDA tensors (the
_cuda tests, skipped without a GPU)."""

import pytest
import torch
from conftest import needs_cuda
from torch.utils._python_dispatch import TorchDispatchMode

from logprob_kernels import fused_logprobs, reference_logprobs
from logprob_kernels.logprobs import _fused_logprobs


def make_inputs(N, H, V, dtype, seed=0, n_ignored=3, device="cpu"):
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same values on every device
    hidden = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 3).to(device, dtype).requires_grad_()  # logits of std ~3
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.randperm(N, generator=g)[:n_ignored]] = -100
    # Upstream gradients for both outputs, so the logp and the entropy gradient are each checked.
    g_logp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    return hidden, weight, targets.to(device), g_logp.to(device), g_ent.to(device)


def run(fn, hidden, weight, targets, g_logp, g_ent, **kw):
    hidden.grad = weight.grad = None
    logp, ent = fn(hidden, weight, targets, return_entropy=True, **kw)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return logp.detach(), ent.detach(), hidden.grad.clone(), weight.grad.clone()


def assert_close(name, got, want, rtol):
    """Max error relative to the largest reference value (elementwise rtol breaks down near 0)."""
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol} * {scale:.3g}"


def check_against_reference(fn, N, H, V, dtype, temperature, device="cpu", rtol=None, **kw):
    inputs = make_inputs(N, H, V, dtype, device=device)
    got = run(fn, *inputs, temperature=temperature, **kw)
    # The reference runs in fp64 on the same values: at V = 151936 an fp32 reference is itself off by
    # ~2e-5 in grad hidden (measured), more than the 1e-5 asked of us, so it cannot be the judge.
    hidden, weight, targets, g_logp, g_ent = inputs
    exact = (hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_())
    want = run(reference_logprobs, *exact, targets, g_logp.double(), g_ent.double(), temperature=temperature)
    # fp32: 1e-5. bf16: the reference saw the same bf16 values; what is left is bf16 rounding of the
    # outputs/grads (and on the Triton path of the logits and dz chunks): 2e-2.
    rtol = rtol or (1e-5 if dtype == torch.float32 else 2e-2)
    expected_dtypes = [torch.float32, torch.float32, dtype, dtype]
    for name, a, b, dt in zip(["logp", "entropy", "grad hidden", "grad weight"], got, want, expected_dtypes):
        assert a.dtype == dt, name
        assert_close(name, a, b, rtol)
    ignored = inputs[2] == -100
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all()
    assert (got[2][ignored] == 0).all(), "ignored tokens must get no gradient"
    assert (got[1][~ignored] > 0).all()  # the entropy of a non-degenerate distribution


# -----------------------------------------------------------------------------
# Torch path (the CPU default), at the real vocabulary size: V = 151936 is not a multiple of the
# vocab chunk (16384), and N = 37 is not a multiple of token_chunk = 16.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_torch_path_matches_reference(dtype, temperature):
    check_against_reference(_fused_logprobs, 37, 16, 151936, dtype, temperature, backend="torch", token_chunk=16)


def test_public_entry_point_cpu_defaults():
    """fused_logprobs on CPU tensors, default chunks, logp only."""
    hidden, weight, targets, g_logp, _ = make_inputs(50, 24, 5003, torch.float32)
    logp = fused_logprobs(hidden, weight, targets, temperature=0.7)
    (logp * g_logp).sum().backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = reference_logprobs(hidden, weight, targets, temperature=0.7)
    (want * g_logp).sum().backward()
    assert logp.dtype == torch.float32 and logp.shape == (50,)
    assert_close("logp", logp.detach(), want.detach(), 1e-5)
    assert_close("grad hidden", gh, hidden.grad, 1e-5)
    assert_close("grad weight", gw, weight.grad, 1e-5)


# -----------------------------------------------------------------------------
# Triton kernels, through the interpreter on CPU (tiny shapes: each program costs milliseconds).
# conftest.py turns the interpreter on only without CUDA; with a GPU, the _cuda tests below run
# the compiled kernels instead (a compiled Triton kernel cannot take CPU tensors).

interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter is on only without CUDA "
                                 "(conftest.py); the _cuda tests run the compiled kernels")


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_triton_kernels_match_reference(dtype, temperature):
    # V = 1000 in vocab chunks of 384: the last chunk has 232 columns, masked inside a 256 block.
    check_against_reference(_fused_logprobs, 37, 32, 1000, dtype, temperature,
                            backend="triton", token_chunk=16, vocab_chunk=384)


@interpreter
def test_triton_kernels_few_thousand_vocab():
    """V = 3001 in one chunk: several BLOCK_V column blocks per row inside the kernel."""
    check_against_reference(_fused_logprobs, 9, 32, 3001, torch.float32, 0.6, backend="triton", vocab_chunk=8192)


# -----------------------------------------------------------------------------
# The same on a GPU: CUDA tensors, the compiled Triton kernels, bf16 as the trainer runs them, at the
# real vocabulary size. Tolerances, relative to the largest value of the fp64 reference on the same
# inputs (assert_close):
#   bf16 2e-2, as in the interpreter: cuBLAS rounds each logits chunk to bf16 (8 significant bits:
#       up to 2^-8 of a logit of ~15, 0.06 in logp, a few 1e-3 of the largest |logp| of ~25) and dz
#       goes back to bf16 for the two gradient matmuls (2^-8 relative each, accumulated in fp32).
#   fp32 1e-4, ten times the CPU's 1e-5: cuBLAS (which may split a 32768-term sum) and Triton's tree
#       reductions order the 151936-term sums differently from the CPU loop; still 200x below bf16.


def cuda_rtol(dtype):
    return 1e-4 if dtype == torch.float32 else 2e-2


@needs_cuda("the compiled Triton kernels on CUDA tensors (bf16 and fp32) against fp64")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [0.6, 1.0])
@pytest.mark.parametrize("chunks", [{}, dict(token_chunk=16, vocab_chunk=384)], ids=["gpu-chunks", "small-chunks"])
def test_triton_kernels_cuda_match_reference(dtype, temperature, chunks):
    check_against_reference(_fused_logprobs, 300, 64, 151936, dtype, temperature, device="cuda",
                            rtol=cuda_rtol(dtype), backend="triton", **chunks)


@needs_cuda("fused_logprobs on CUDA tensors takes the Triton path with the GPU chunks")
def test_public_entry_point_cuda_bf16():
    """N = 4500: two token chunks of the GPU's 4096; V = 151936: four vocab chunks of 32768 and one of 20864."""
    check_against_reference(fused_logprobs, 4500, 64, 151936, torch.bfloat16, 0.6, device="cuda",
                            rtol=cuda_rtol(torch.bfloat16))


# -----------------------------------------------------------------------------
# Edge cases and errors.


@pytest.mark.parametrize("backend,device", [
    ("torch", "cpu"), pytest.param("triton", "cpu", marks=interpreter),
    pytest.param("triton", "cuda", marks=needs_cuda("all-ignored targets, a frozen weight, compiled Triton"))],
    ids=["torch", "triton", "triton-cuda"])
def test_all_ignored_and_frozen_weight(backend, device):
    hidden, weight, targets, _, _ = make_inputs(5, 8, 50, torch.float32, device=device)
    weight.requires_grad_(False)  # the frozen reference model of the KL term
    logp, ent = _fused_logprobs(hidden, weight, torch.full_like(targets, -1), ignore_index=-1,
                                return_entropy=True, backend=backend)
    (logp.sum() + ent.sum()).backward()
    assert (logp == 0).all() and (ent == 0).all() and (hidden.grad == 0).all()
    with torch.no_grad():  # the reference/old policy log-probs
        lp = _fused_logprobs(hidden, weight, targets, backend=backend)
    assert_close("logp no_grad", lp, reference_logprobs(hidden, weight, targets).detach(), 1e-5)


def test_bad_input_is_named():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="weight must be"):
        fused_logprobs(h, torch.randn(10, 7), t)
    with pytest.raises(ValueError, match="hidden must be"):
        fused_logprobs(h[None], w, t)
    with pytest.raises(ValueError, match="targets must be a LongTensor"):
        fused_logprobs(h, w, t.int())
    with pytest.raises(ValueError, match="targets must be in"):
        fused_logprobs(h, w, torch.tensor([0, 1, 10, -100]))
    with pytest.raises(ValueError, match="dtype"):
        fused_logprobs(h, w.bfloat16(), t)
    with pytest.raises(ValueError, match="temperature"):
        fused_logprobs(h, w, t, temperature=0.0)


# -----------------------------------------------------------------------------
# Memory: the largest tensor the fused path ever allocates, forward and backward, is a chunk (or
# the [V, H] weight gradient it must return), not [N, V]. (The Triton kernels allocate nothing:
# they rewrite the logits chunk in place.)


class LargestAllocation(TorchDispatchMode):
    """Records the size in bytes of the largest tensor created by any op while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def largest_allocation(fn, N, H, V, device="cpu", **kw):
    hidden, weight, targets, g_logp, g_ent = make_inputs(N, H, V, torch.float32, device=device)
    with LargestAllocation() as mode:
        logp, ent = fn(hidden, weight, targets, return_entropy=True, **kw)
        ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    assert weight.grad is not None
    return mode.largest


@pytest.mark.parametrize("backend,device", [
    ("torch", "cpu"), pytest.param("triton", "cuda", marks=needs_cuda("what the compiled Triton path allocates"))],
    ids=["cpu", "triton-cuda"])
def test_memory_grows_with_chunk_not_with_n_times_v(backend, device):
    H, V, chunks = 16, 151936, dict(backend=backend, token_chunk=128, vocab_chunk=4096)
    bound = max(128 * 4096 * 4, V * H * 4)  # a fp32 logits chunk, or the [V, H] grad_weight
    # The tracker does see the naive path's [N, V] logits (so this test can fail).
    assert largest_allocation(reference_logprobs, 300, H, V, device) >= 300 * V * 4
    small = largest_allocation(_fused_logprobs, 300, H, V, device, **chunks)
    large = largest_allocation(_fused_logprobs, 600, H, V, device, **chunks)
    assert small == large <= bound, (small, large, bound)
    assert large * 20 < 600 * V * 4
