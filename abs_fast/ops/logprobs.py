"""Log-probabilities (and entropies) of target tokens under a frozen LM head, never materialising
[tokens x vocab] logits.

The vocabulary is walked in chunks with an online log-sum-exp (Triton on a GPU or under
TRITON_INTERPRET=1; the same algorithm in PyTorch otherwise). Backward recomputes each chunk's
logits and returns the gradient for `hidden` only: the head is frozen, so the weight-gradient GEMM
(a third of a trainable head's cost) is skipped.
"""

from __future__ import annotations

import math

import torch

from abs_fast.ops.backend import matmul_fp32_out, select_backend, triton_interpreting

__all__ = ["token_logprobs", "token_logprobs_reference"]

IGNORE_INDEX = -100
# Largest [tokens x chunk] fp32 block the PyTorch paths hold at once (the Triton forward holds
# only register tiles).
CHUNK_ELEMENTS = 1 << 24
# The Triton backward writes one [tokens x chunk] gradient block (model dtype) per GEMM: large
# chunks mean few GEMMs, each accumulated into the fp32 hidden gradient in place.
BACKWARD_CHUNK_BYTES = 1 << 27


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _chunk_size(T: int, V: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return min(chunk_size, V)
    return max(128, min(V, (CHUNK_ELEMENTS // max(T, 1)) // 128 * 128))


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, v0: int, v1: int, inv_temperature: float):
    """fp32 logits of one vocabulary chunk (products accumulated in fp32)."""
    w = weight[v0:v1]
    if hidden.dtype == torch.float32:
        return (hidden @ w.T).mul_(inv_temperature)
    return (hidden.float() @ w.float().T).mul_(inv_temperature)


def _stats_reference(hidden, weight, safe_targets, inv_temperature, chunk):
    """(lse, target logit, entropy) per token, online over vocabulary chunks. The entropy sum is
    kept relative to the running max (sum p * (logit - m)), so a large common logit offset does
    not cancel catastrophically in lse - E[logit]."""
    T, V = hidden.shape[0], weight.shape[0]
    m = torch.full((T,), -math.inf, device=hidden.device)
    s = torch.zeros(T, device=hidden.device)
    e = torch.zeros(T, device=hidden.device)
    tgt = torch.zeros(T, device=hidden.device)
    for v0 in range(0, V, chunk):
        v1 = min(V, v0 + chunk)
        logits = _chunk_logits(hidden, weight, v0, v1, inv_temperature)
        inside = (safe_targets >= v0) & (safe_targets < v1)
        picked = logits.gather(1, (safe_targets - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
        tgt = tgt + torch.where(inside, picked, 0.0)
        m_new = torch.maximum(m, logits.amax(dim=1))
        rescale = torch.exp(m - m_new)
        shifted = logits.sub_(m_new[:, None])  # in place: two [tokens, chunk] blocks at once
        p = torch.exp(shifted)
        e = rescale * (e + s * torch.where(s > 0, m - m_new, 0.0)) + torch.bmm(p[:, None], shifted[:, :, None]).view(-1)
        s = s * rescale + p.sum(dim=1)
        m = m_new
        del logits, shifted, p
    return m + torch.log(s), tgt, torch.log(s) - e / s


def _exact_fp32(hidden: torch.Tensor) -> bool:
    """fp32 logits with exact products unless torch itself allows tf32 matmuls (as the PyTorch path does)."""
    return hidden.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _stats_triton(hidden, weight, safe_targets, inv_temperature):
    from abs_fast.kernels import logprobs as k

    T, K = hidden.shape
    V = weight.shape[0]
    block_t = 32 if triton_interpreting() else 64
    block_v = 128
    block_k = min(128 if triton_interpreting() else 64, max(16, 1 << (K - 1).bit_length()))
    t_blocks = -(-T // block_t)
    if triton_interpreting():
        n_splits = 1
    else:  # enough programs to fill the GPU, each split a whole number of chunks
        sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count
        n_splits = max(1, min(-(-V // block_v), -(-2 * sms // t_blocks)))
    v_per_split = _cdiv(_cdiv(V, n_splits), block_v) * block_v
    n_splits = -(-V // v_per_split)
    stats = torch.empty(4, n_splits, T, device=hidden.device, dtype=torch.float32)
    k.token_stats_kernel[(t_blocks, n_splits)](
        hidden, weight, safe_targets, stats[0], stats[1], stats[2], stats[3],
        T, V, K, inv_temperature, v_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_K=block_k, IEEE=_exact_fp32(hidden),
        num_warps=8,  # 4 warps spill registers at these tiles (tests/test_kernels_compile.py)
    )
    m, s, e, tgt = stats  # per split; e is sum p * (logit - m) with the split's own m
    m_all = m.amax(dim=0)
    weights = torch.exp(m - m_all)
    s_all = (s * weights).sum(dim=0)
    e_all = (weights * (e + s * (m - m_all))).sum(dim=0)
    return m_all + torch.log(s_all), tgt.sum(dim=0), torch.log(s_all) - e_all / s_all


def grad_chunk_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the backward's [tokens, chunk] gradient blocks: bf16 for bf16 models (its range is
    fp32's), fp32 otherwise. fp16 would flush most p * dlogp terms (about 1/vocab times a small
    dlogp) below its smallest subnormal, 6e-8, and bias every gradient."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _grad_chunk_triton(hidden, weight, safe_targets, lse, entropy, dlogp, dent, v0, v1, inv_temperature):
    from abs_fast.kernels import logprobs as k

    T, K = hidden.shape
    chunk = v1 - v0
    g = torch.empty(T, chunk, device=hidden.device, dtype=grad_chunk_dtype(hidden.dtype))
    block_t, block_v = (32, 128) if triton_interpreting() else (64, 128)
    block_k = min(128 if triton_interpreting() else 64, max(16, 1 << (K - 1).bit_length()))
    has_entropy = dent is not None
    k.token_grad_chunk_kernel[(-(-T // block_t), -(-chunk // block_v))](
        hidden, weight, safe_targets, lse, entropy if has_entropy else lse, dlogp, dent if has_entropy else dlogp, g,
        T, weight.shape[0], K, v0, chunk, inv_temperature,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), g.stride(0), g.stride(1),
        HAS_ENTROPY=has_entropy, BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_K=block_k, IEEE=_exact_fp32(hidden),
        num_warps=8,  # as the statistics: fewer warps spill registers (fp32 above all)
    )
    return g


def _grad_chunk_reference(hidden, weight, safe_targets, lse, entropy, dlogp, dent, v0, v1, inv_temperature):
    """The chunk's gradient w.r.t. its logits, in place as far as possible: two [tokens, chunk]
    blocks at once (three with an entropy gradient)."""
    logp = _chunk_logits(hidden, weight, v0, v1, inv_temperature).sub_(lse[:, None])
    g = torch.exp(logp)  # p
    if dent is not None:  # d entropy / d logit = -p * (logp + entropy)
        logp.add_(entropy[:, None]).mul_(g).mul_(dent[:, None])
    g.mul_(-dlogp[:, None])
    if dent is not None:
        g.sub_(logp)
    del logp
    inside = (safe_targets >= v0) & (safe_targets < v1)
    rows = inside.nonzero().squeeze(1)
    g[rows, safe_targets[rows] - v0] += dlogp[rows]
    return g.mul_(inv_temperature)


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temperature, chunk, use_triton):
        ctx.set_materialize_grads(False)  # an unused output (entropy) gets None, and costs nothing
        valid = targets != IGNORE_INDEX
        safe_targets = torch.where(valid, targets, 0)
        if use_triton:
            lse, tgt, entropy = _stats_triton(hidden, weight, safe_targets, inv_temperature)
        else:
            lse, tgt, entropy = _stats_reference(hidden, weight, safe_targets, inv_temperature, chunk)
        logprobs = torch.where(valid, tgt - lse, 0.0)
        ctx.save_for_backward(hidden, weight, safe_targets, valid, lse, entropy)
        ctx.inv_temperature, ctx.chunk, ctx.use_triton = inv_temperature, chunk, use_triton
        return logprobs, entropy

    @staticmethod
    def backward(ctx, dlogp, dent):
        hidden, weight, safe_targets, valid, lse, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        dlogp = torch.where(valid, dlogp.float(), 0.0) if dlogp is not None else torch.zeros_like(lse)
        dent = dent.float().contiguous() if dent is not None else None
        grad_chunk = _grad_chunk_triton if ctx.use_triton else _grad_chunk_reference
        dh = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)
        V = weight.shape[0]
        chunk = ctx.chunk
        if ctx.use_triton and not triton_interpreting():
            T = hidden.shape[0]
            g_bytes = torch.finfo(grad_chunk_dtype(hidden.dtype)).bits // 8
            chunk = max(chunk, min(V, BACKWARD_CHUNK_BYTES // (T * g_bytes) // 128 * 128))
        for v0 in range(0, V, chunk):
            v1 = min(V, v0 + chunk)
            g = grad_chunk(hidden, weight, safe_targets, lse, entropy, dlogp.contiguous(), dent, v0, v1,
                           ctx.inv_temperature)
            dh = _accumulate(dh, g, weight[v0:v1])
            del g  # freed before the next chunk's blocks are made
        return dh.to(hidden.dtype), None, None, None, None, None


def _accumulate(dh: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """dh + g @ w with fp32 accumulation into dh: in place for fp32; for 16-bit g and w on CUDA one
    GEMM with an fp32 result (no 16-bit product, no fp32 copy of it); elsewhere fp32 products."""
    if g.dtype == torch.float32 and w.dtype == torch.float32:
        return dh.addmm_(g, w)
    if dh.is_cuda and matmul_fp32_out(dh.device.type):
        return torch.addmm(dh, g, w, out_dtype=torch.float32)
    return dh.addmm_(g.float(), w.float())


def _prepare(hidden, lm_head_weight, targets, temperature):
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must match hidden's leading dims {tuple(hidden.shape[:-1])}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight must be [vocab, {hidden.shape[-1]}], got {tuple(lm_head_weight.shape)}")
    if lm_head_weight.requires_grad:
        raise ValueError("lm_head_weight must be frozen (requires_grad=False): token_logprobs computes no head "
                         "gradient; pass weight.detach() if the head is shared with trainable code")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 or int32 token ids, got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    V = lm_head_weight.shape[0]
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        raise ValueError(f"targets hold ids outside [0, {V}) (and not the ignore index {IGNORE_INDEX}): "
                         f"{targets[bad][:5].tolist()}")
    K = hidden.shape[-1]
    return hidden.reshape(-1, K), targets.reshape(-1).long(), 1.0 / float(temperature)


def token_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                   temperature: float = 1.0, return_entropy: bool = False, chunk_size: int | None = None,
                   backend: str | None = None):
    """log softmax(hidden @ lm_head_weight^T / temperature)[targets], chunked over the vocabulary.

    hidden [..., K] (differentiable); lm_head_weight [V, K] (frozen); targets [...] token ids, or
    -100 to ignore a position (its log-prob is 0 and it passes no gradient). Returns fp32 log-probs
    [...], and with return_entropy=True also the entropy [...] of each position's distribution
    (differentiable too). backend: "auto" | "triton" | "reference" (see abs_fast.ops.backend).
    """
    h2d, t1d, inv_temperature = _prepare(hidden, lm_head_weight, targets, temperature)
    T, V = h2d.shape[0], lm_head_weight.shape[0]
    shape = targets.shape
    if T == 0:
        empty = hidden.new_zeros(shape, dtype=torch.float32) + hidden.sum() * 0
        return (empty, empty.clone()) if return_entropy else empty
    use_triton = select_backend(hidden.device, hidden.dtype, backend) == "triton"
    if use_triton:
        h2d, weight = h2d.contiguous(), lm_head_weight.contiguous()
    else:
        weight = lm_head_weight
    chunk = _chunk_size(T, V, chunk_size)
    logprobs, entropy = TokenLogprobsFunction.apply(h2d, weight, t1d, inv_temperature, chunk, use_triton)
    if return_entropy:
        return logprobs.reshape(shape), entropy.reshape(shape)
    return logprobs.reshape(shape)


def token_logprobs_reference(hidden, lm_head_weight, targets, temperature: float = 1.0):
    """The plain definition, [T, V] logits and all: for tests only."""
    logits = (hidden.double() @ lm_head_weight.double().T) / temperature
    logp = torch.log_softmax(logits, dim=-1)
    valid = targets != IGNORE_INDEX
    picked = logp.gather(-1, torch.where(valid, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, picked, 0.0), entropy
