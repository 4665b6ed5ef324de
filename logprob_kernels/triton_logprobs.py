"""
The Triton half of the fused log-prob kernel: the per-chunk work of logprob_kernels/logprobs.py on CUDA.

logprobs.py computes each chunk of raw logits z = h_chunk @ w_chunk^T with cuBLAS (tensor cores,
bf16 in, bf16 out, exactly as the model's own lm_head would) and hands it to these two kernels.
One program handles one token row of the chunk and walks its columns BLOCK_V at a time, in fp32:

  lse_update: the online log-sum-exp. Running max m, s = sum exp(z - m), a = sum exp(z - m) z,
      each rescaled by exp(m_old - m_new) when the max grows; plus the target's logit z_t if the
      target falls in this chunk's columns. After the last chunk: lse = m + log s, S = a / s,
      logp = z_t - lse, entropy = lse - S.
  grad: rewrites the logits chunk in place into the gradient w.r.t. the raw logits,
      p = exp(z - lse),  dz = (g_logp ([v = t] - p) + g_ent p (S - z)) / T,
      which cuBLAS then multiplies into dL/dh (dz @ W) and dL/dW (dz^T @ h).

No row of the chunk ever leaves fp32 registers in between, and nothing of size [N, V] exists.
Under TRITON_INTERPRET=1 (CPU, the tests) the same kernels run in numpy; there are no tl.dot
here, so the interpreter's wrong bf16 dot products do not matter.
"""

import triton
import triton.language as tl


@triton.jit
def _lse_update_kernel(z_ptr, stride_z, t_ptr, m_ptr, s_ptr, a_ptr, zt_ptr, n_cols, v0, inv_temp,
                       BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_z
    t = tl.load(t_ptr + row) - v0  # the target's column in this chunk (out of range if elsewhere)
    m = tl.load(m_ptr + row)
    s = tl.load(s_ptr + row)
    a = tl.load(a_ptr + row)
    zt = tl.load(zt_ptr + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        scale = tl.exp(m - m_new)  # 0 on the first block (m = -inf)
        e = tl.exp(z - m_new)  # masked columns: exp(-inf) = 0
        s = s * scale + tl.sum(e, axis=0)
        a = a * scale + tl.sum(tl.where(mask, e * z, 0.0), axis=0)  # where: 0 * -inf is nan
        zt += tl.sum(tl.where(mask & (cols == t), z, 0.0), axis=0)  # mask: t may index a padded column
        m = m_new
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(a_ptr + row, a)
    tl.store(zt_ptr + row, zt)


@triton.jit
def _grad_kernel(z_ptr, stride_z, t_ptr, lse_ptr, S_ptr, g_logp_ptr, g_ent_ptr, n_cols, v0, inv_temp,
                 BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_z
    t = tl.load(t_ptr + row) - v0
    lse = tl.load(lse_ptr + row)
    S = tl.load(S_ptr + row)
    g_logp = tl.load(g_logp_ptr + row)
    g_ent = tl.load(g_ent_ptr + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
        p = tl.exp(z - lse)
        dz = g_logp * (tl.where(cols == t, 1.0, 0.0) - p) + g_ent * p * (S - z)
        tl.store(z_row + cols, (dz * inv_temp).to(z_ptr.dtype.element_ty), mask=mask)


def _block(n_cols):
    return min(4096, triton.next_power_of_2(n_cols))


def lse_update(z, t, v0, inv_temp, m, s, a, zt):
    """Fold the logits chunk z [n, v] (columns v0..) into the fp32 row statistics m, s, a, zt [n], in place."""
    _lse_update_kernel[(z.shape[0],)](z, z.stride(0), t, m, s, a, zt, z.shape[1], v0, inv_temp,
                                      BLOCK_V=_block(z.shape[1]), num_warps=8)


def grad(z, t, v0, inv_temp, lse, S, g_logp, g_ent):
    """Turn the logits chunk z [n, v] in place into d loss / d z; returns it."""
    _grad_kernel[(z.shape[0],)](z, z.stride(0), t, lse, S, g_logp, g_ent, z.shape[1], v0, inv_temp,
                                BLOCK_V=_block(z.shape[1]), num_warps=8)
    return z
