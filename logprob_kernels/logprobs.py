"""
log p(target) and entropy of every token, straight from hidden states and the lm_head, never
holding the [N, V] logits.

Why: SFT and DeGRPO need log p(target token) for every response token. The obvious way builds
logits [N, V] and a log-softmax of the same size: for N = 16k tokens and V = 151936 that is
16384 * 151936 * 4 B = 10 GB in fp32, and as much again for its gradient. Here the logits exist
one chunk at a time, [token_chunk, vocab_chunk], in the forward and in the backward.

The math, with z_v = (h . w_v) / T the tempered logit of vocabulary entry v:
    lse     = log sum_v exp(z_v)                  online over vocab chunks (running max m,
                                                  s = sum exp(z - m), rescaled when m grows)
    logp    = z_t - lse                           t = the target token
    p_v     = exp(z_v - lse)
    S       = sum_v p_v z_v                       accumulated with s: a = sum exp(z - m) z, S = a / s
    entropy = -sum_v p_v log p_v = lse - S
The forward keeps only four numbers per token (m, s, a, z_t -> lse, S, logp). The backward
recomputes each logits chunk and turns it in place into the gradient w.r.t. the logits:
    d logp    / d z_v = [v = t] - p_v
    d entropy / d z_v = p_v (S - z_v)
    dz_v = g_logp ([v = t] - p_v) + g_ent p_v (S - z_v)      (then / T for the raw logit h . w_v)
    dL/dh   += dz      @ W_chunk                             (token_chunk, H)
    dL/dW_c += dz^T    @ h_chunk                             (vocab_chunk, H)
Tokens whose target is ignore_index get logp = entropy = 0 and g = 0, hence no gradient.

Two backends run the same chunk loop (below, in torch): the matmuls are torch.mm (cuBLAS on GPU),
and the per-chunk work (online log-sum-exp + gather, and the logits -> gradient step) is
  - "triton" (CUDA tensors): one Triton kernel each, in triton_logprobs.py; the logits chunk is
    computed in the input dtype (bf16 like the model's own logits), the kernels work in fp32, and
    dz goes back to bf16 for the two gradient matmuls, which accumulate into fp32.
  - "torch" (CPU): the same steps in plain torch, in fp32, so the project trains on a laptop.
Triton is imported only when the Triton backend is used: CPU users need not have it.
"""

import torch

# Chunk sizes. Peak extra memory is a few [TOKEN_CHUNK, VOCAB_CHUNK] buffers, plus fp32 [N, H] and
# [VOCAB_CHUNK, H] gradient accumulators. GPU: 4096 x 32768 bf16 = 256 MB per logits chunk, big
# enough that each matmul runs at full cuBLAS speed. CPU: 1024 x 16384 fp32 = 64 MB.
CHUNKS = {"triton": (4096, 32768), "torch": (1024, 16384)}

# -----------------------------------------------------------------------------
# The obvious version: what the tests and the benchmark compare against.


def reference_logprobs(hidden, weight, targets, temperature=1.0, ignore_index=-100, return_entropy=False):
    """Plain torch, full [N, V] logits in fp32 (fp64 if given fp64: the tests' ground truth at V = 151936,
    where fp32 sums over the vocabulary are themselves off by ~2e-5). Same signature as fused_logprobs."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(dtype) @ weight.to(dtype).t() / temperature  # (N, V)
    logp_all = torch.log_softmax(logits, dim=-1)  # (N, V)
    valid = targets != ignore_index  # (N,)
    safe = torch.where(valid, targets, 0)
    logp = torch.where(valid, logp_all.gather(1, safe[:, None]).squeeze(1), 0.0)  # (N,)
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (N,)
    return logp, torch.where(valid, entropy, 0.0)


# -----------------------------------------------------------------------------
# Per-chunk work in plain torch (the CPU backend). z is one chunk of raw logits h . w_v,
# columns v0 .. v0 + z.shape[1]; t holds the targets of its rows (-1 for ignored rows).


def _torch_lse_update(z, t, v0, inv_temp, m, s, a, zt):
    """Fold a logits chunk into the running per-row statistics m, s, a, zt (fp32, in place)."""
    z = z.float().mul_(inv_temp)  # (n, v) tempered logits
    m_new = torch.maximum(m, z.amax(1))  # (n,)
    scale = torch.exp(m - m_new)  # (n,) rescales the old sums to the new max; 0 on the first chunk
    e = (z - m_new[:, None]).exp_()  # (n, v); with z, the only chunk-sized tensors alive
    s.mul_(scale).add_(e.sum(1))
    a.mul_(scale).add_(e.mul_(z).sum(1))
    m.copy_(m_new)
    col = t - v0  # (n,) the target's column in this chunk, if it is in this chunk
    hit = (col >= 0) & (col < z.shape[1])
    zt.add_(torch.where(hit, z.gather(1, col.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), 0.0))


def _torch_grad(z, t, v0, inv_temp, lse, S, g_logp, g_ent):
    """Logits chunk -> gradient w.r.t. those raw logits: dz = g_logp([v=t] - p) + g_ent p (S - z)."""
    z = z.float().mul_(inv_temp)  # (n, v)
    p = (z - lse[:, None]).exp_()  # (n, v)
    dz = p.mul_(z.sub_(S[:, None]).mul_(-g_ent[:, None]).sub_(g_logp[:, None]))  # (n, v), in place of p and z
    col = t - v0
    hit = (col >= 0) & (col < z.shape[1])
    dz.scatter_add_(1, col.clamp(0, z.shape[1] - 1)[:, None], torch.where(hit, g_logp, 0.0)[:, None])
    return dz.mul_(inv_temp)  # d/d(h . w_v) = d/dz_v / T


# -----------------------------------------------------------------------------
# The chunk loop, shared by both backends.


def _chunk_ops(backend):
    if backend == "triton":
        from . import triton_logprobs  # lazy: only CUDA users (and the interpreter test) need triton

        return triton_logprobs.lse_update, triton_logprobs.grad
    return _torch_lse_update, _torch_grad


class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, backend, token_chunk, vocab_chunk):
        lse_update, _ = _chunk_ops(backend)
        # The matmul dtype: fp32 on the torch backend (exact on CPU), the input dtype on Triton (cuBLAS bf16).
        cdtype = torch.float32 if backend == "torch" else hidden.dtype
        N, V, inv_temp = hidden.shape[0], weight.shape[0], 1.0 / temperature
        valid = targets != ignore_index  # (N,)
        t = torch.where(valid, targets, -1)  # (N,) -1 never matches a column
        h = hidden.to(cdtype)  # (N, H)
        f32 = dict(dtype=torch.float32, device=hidden.device)
        m = torch.full((N,), float("-inf"), **f32)  # running max of z
        s, a, zt = torch.zeros(N, **f32), torch.zeros(N, **f32), torch.zeros(N, **f32)
        for v0 in range(0, V, vocab_chunk):
            w = weight[v0:v0 + vocab_chunk].to(cdtype)  # (v, H)
            for n0 in range(0, N, token_chunk):
                n1 = n0 + token_chunk
                z = h[n0:n1] @ w.t()  # (n, v) raw logits: one chunk, never (N, V)
                lse_update(z, t[n0:n1], v0, inv_temp, m[n0:n1], s[n0:n1], a[n0:n1], zt[n0:n1])
        lse = m + torch.log(s)  # (N,)
        S = a / s  # (N,) sum_v p_v z_v
        logp = torch.where(valid, zt - lse, 0.0)
        entropy = torch.where(valid, lse - S, 0.0)
        ctx.save_for_backward(hidden, weight, t, valid, lse, S)
        ctx.args = (inv_temp, backend, token_chunk, vocab_chunk)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, t, valid, lse, S = ctx.saved_tensors
        inv_temp, backend, token_chunk, vocab_chunk = ctx.args
        _, grad_op = _chunk_ops(backend)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cdtype = torch.float32 if backend == "torch" else hidden.dtype
        N, V = hidden.shape[0], weight.shape[0]
        g_logp = torch.where(valid, g_logp.float(), 0.0)  # ignored rows: no gradient
        g_ent = torch.where(valid, g_ent.float(), 0.0)
        h = hidden.to(cdtype)  # (N, H)
        # fp32 accumulators: grad_h sums over all vocab chunks, grad_w over all token chunks.
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_weight = torch.empty_like(weight) if need_w else None
        for v0 in range(0, V, vocab_chunk):
            w = weight[v0:v0 + vocab_chunk].to(cdtype)  # (v, H)
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
            for n0 in range(0, N, token_chunk):
                n1 = n0 + token_chunk
                z = h[n0:n1] @ w.t()  # (n, v) recomputed logits
                dz = grad_op(z, t[n0:n1], v0, inv_temp, lse[n0:n1], S[n0:n1], g_logp[n0:n1], g_ent[n0:n1])
                if need_h:
                    grad_h[n0:n1].add_(dz @ w)  # (n, H)
                if need_w:
                    grad_w.add_(dz.t() @ h[n0:n1])  # (v, H)
            if need_w:
                grad_weight[v0:v0 + vocab_chunk] = grad_w
        grad_hidden = grad_h.to(hidden.dtype) if need_h else None
        return grad_hidden, grad_weight, None, None, None, None, None, None


# -----------------------------------------------------------------------------
# The entry point.


def _check(hidden, weight, targets, temperature):
    """Clear errors before any work: name the tensor and what was expected."""
    if hidden.dim() != 2:
        raise ValueError(f"fused_logprobs: hidden must be [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"fused_logprobs: weight must be [V, H={hidden.shape[1]}], got shape {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],) or targets.dtype != torch.long:
        raise ValueError(f"fused_logprobs: targets must be a LongTensor [N={hidden.shape[0]}], "
                         f"got {targets.dtype} of shape {tuple(targets.shape)}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"fused_logprobs: hidden and weight must share one floating dtype, "
                         f"got {hidden.dtype} and {weight.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"fused_logprobs: hidden, weight, targets on different devices: "
                         f"{hidden.device}, {weight.device}, {targets.device}")
    if not float(temperature) > 0:
        raise ValueError(f"fused_logprobs: temperature must be > 0, got {temperature}")


def _fused_logprobs(hidden, weight, targets, temperature=1.0, ignore_index=-100, return_entropy=False,
                    backend="torch", token_chunk=None, vocab_chunk=None):
    """fused_logprobs with the backend and chunk sizes chosen by hand (tests run backend="triton" on CPU)."""
    _check(hidden, weight, targets, temperature)
    V = weight.shape[0]
    valid = targets != ignore_index
    if bool(((targets[valid] < 0) | (targets[valid] >= V)).any()):  # one host sync, worth the clear error
        raise ValueError(f"fused_logprobs: targets must be in [0, {V}) or ignore_index={ignore_index}")
    default_tokens, default_vocab = CHUNKS[backend]
    logp, entropy = _FusedLogprobs.apply(hidden, weight, targets, float(temperature), ignore_index, backend,
                                         token_chunk or default_tokens, vocab_chunk or default_vocab)
    return (logp, entropy) if return_entropy else logp


def fused_logprobs(hidden, weight, targets, temperature=1.0, ignore_index=-100, return_entropy=False):
    """
    hidden [N, H], weight [V, H] (the lm_head), targets [N] long -> logp [N] fp32, where
    logp = (h . w_target) / T - logsumexp_v((h . w_v) / T); 0 for targets == ignore_index.
    With return_entropy, also the entropy [N] fp32 of the same tempered distribution.
    Both are differentiable w.r.t. hidden and weight. CUDA tensors run the Triton kernels.
    """
    backend = "triton" if hidden.is_cuda else "torch"
    return _fused_logprobs(hidden, weight, targets, temperature, ignore_index, return_entropy, backend)
