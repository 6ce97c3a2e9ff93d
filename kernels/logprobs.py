"""Triton kernels for token log-probabilities under a frozen LM head, chunked over the vocabulary.

    logits[t, v] = hidden[t] . W[v] / temperature
    logprob[t]   = logits[t, target[t]] - logsumexp_v logits[t, v]
    entropy[t]   = logsumexp_v logits[t, v] - sum_v softmax(logits[t])_v * logits[t, v]

Forward (`token_stats_kernel`): one program per (token block, vocabulary split) walks its split in
BLOCK_V chunks, each chunk a [BLOCK_T, BLOCK_V] tile of logits computed over K in registers, and
keeps an online log-sum-exp: running max m, s = sum of exp(logit - m), e = sum of
exp(logit - m) * (logit - m) (relative to m, so the entropy log s - e / s does not cancel a large
common offset), and the target's logit when it falls in the split. Partial statistics per split are combined by
the caller (a few numbers per token). No [T, V] tensor exists.

Backward (`token_grad_chunk_kernel`): for one vocabulary chunk [v0, v0 + v_chunk), recompute the
logit tile and write the gradient with respect to the logits,

    g[t, v] = dlogp[t] * (1[v = target] - p) - dent[t] * p * (log p + H[t]),   p = softmax(logits)[v],

scaled by 1 / temperature; the caller multiplies g by W[chunk] (one GEMM per chunk). The head
gets no gradient, so its weight-gradient GEMM is never computed.
"""

import triton
import triton.language as tl


@triton.jit
def _logit_tile(h_ptr, w_ptr, offs_t, offs_v, t_mask, v_mask, K, stride_ht, stride_hk, stride_wv, stride_wk,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """hidden[offs_t] @ W[offs_v]^T as a [BLOCK_T, BLOCK_V] fp32 tile (masked rows and columns are 0).
    IEEE: exact fp32 products (fp32 models without tf32); else tl.dot's default, which rounds fp32
    inputs to tf32 on tensor cores (bf16/fp16 inputs are exact either way)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        h = tl.load(h_ptr + offs_t[:, None] * stride_ht + (k0 + offs_k)[None, :] * stride_hk,
                    mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + offs_v[:, None] * stride_wv + (k0 + offs_k)[None, :] * stride_wk,
                    mask=v_mask[:, None] & k_mask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    return acc


# The token count T and the split sizes follow the batch: they are run-time values that Triton must
# not specialise on (a value of 1 or a multiple of 16 would otherwise compile a variant of its own),
# so one compiled kernel serves every micro-batch.
# the four outputs are rows of one [4, n_splits, T] buffer: their alignment follows T too
@triton.jit(do_not_specialize=["T", "v_per_split"],
            do_not_specialize_on_alignment=["max_ptr", "sumexp_ptr", "sumexp_logit_ptr", "target_logit_ptr"])
def token_stats_kernel(
    h_ptr, w_ptr, target_ptr,
    max_ptr, sumexp_ptr, sumexp_logit_ptr, target_logit_ptr,  # [n_splits, T] fp32 each
    T, V, K, inv_temperature, v_per_split,
    stride_ht, stride_hk, stride_wv, stride_wk,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    targets = tl.load(target_ptr + offs_t, mask=t_mask, other=-1)

    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_T,), tl.float32)
    e = tl.zeros((BLOCK_T,), tl.float32)
    tgt = tl.zeros((BLOCK_T,), tl.float32)
    v_start = split * v_per_split
    for v0 in range(v_start, v_start + v_per_split, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        logits = _logit_tile(h_ptr, w_ptr, offs_t, offs_v, t_mask, v_mask, K, stride_ht, stride_hk, stride_wv,
                             stride_wk, BLOCK_T, BLOCK_V, BLOCK_K, IEEE) * inv_temperature
        valid = v_mask[None, :]
        masked = tl.where(valid, logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(masked, axis=1))
        rescale = tl.exp(m - m_new)
        p = tl.exp(masked - m_new[:, None])  # 0 where masked
        shifted = tl.where(valid, logits - m_new[:, None], 0.0)
        e = rescale * (e + s * tl.where(s > 0, m - m_new, 0.0)) + tl.sum(p * shifted, axis=1)
        s = s * rescale + tl.sum(p, axis=1)
        m = m_new
        hit = offs_v[None, :] == targets[:, None]
        tgt += tl.sum(tl.where(hit, logits, 0.0), axis=1)

    out = split * T + offs_t
    tl.store(max_ptr + out, m, mask=t_mask)
    tl.store(sumexp_ptr + out, s, mask=t_mask)
    tl.store(sumexp_logit_ptr + out, e, mask=t_mask)
    tl.store(target_logit_ptr + out, tgt, mask=t_mask)


@triton.jit(do_not_specialize=["T", "v0", "v_chunk"])
def token_grad_chunk_kernel(
    h_ptr, w_ptr, target_ptr, lse_ptr, entropy_ptr, dlogp_ptr, dentropy_ptr, g_ptr,
    T, V, K, v0, v_chunk, inv_temperature,
    stride_ht, stride_hk, stride_wv, stride_wk, stride_gt, stride_gv,
    HAS_ENTROPY: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    """g[t, j] for vocabulary entries v0 + j, j < v_chunk (columns past V are written as 0), in g's
    dtype (fp32 for fp32 and fp16 models: fp16 would flush most of p * dlogp to zero)."""
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_j = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_v = v0 + offs_j
    t_mask = offs_t < T
    j_mask = offs_j < v_chunk
    v_mask = (offs_v < V) & j_mask
    logits = _logit_tile(h_ptr, w_ptr, offs_t, offs_v, t_mask, v_mask, K, stride_ht, stride_hk, stride_wv,
                         stride_wk, BLOCK_T, BLOCK_V, BLOCK_K, IEEE) * inv_temperature
    lse = tl.load(lse_ptr + offs_t, mask=t_mask, other=0.0)
    dlogp = tl.load(dlogp_ptr + offs_t, mask=t_mask, other=0.0)
    targets = tl.load(target_ptr + offs_t, mask=t_mask, other=-1)
    logp = logits - lse[:, None]
    p = tl.where(v_mask[None, :], tl.exp(logp), 0.0)
    g = -p * dlogp[:, None]
    g += tl.where(offs_v[None, :] == targets[:, None], dlogp[:, None], 0.0)
    if HAS_ENTROPY:
        entropy = tl.load(entropy_ptr + offs_t, mask=t_mask, other=0.0)
        dent = tl.load(dentropy_ptr + offs_t, mask=t_mask, other=0.0)
        g -= dent[:, None] * p * tl.where(v_mask[None, :], logp + entropy[:, None], 0.0)
    g = g * inv_temperature
    tl.store(g_ptr + offs_t[:, None] * stride_gt + offs_j[None, :] * stride_gv, g.to(g_ptr.dtype.element_ty),
             mask=t_mask[:, None] & j_mask[None, :])
