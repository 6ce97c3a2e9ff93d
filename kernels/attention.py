"""Triton decode attention over a per-row KV cache, GQA without copies (flash-decoding).

One program per (row, KV head, key split): it loads the G query heads of the group once ([D, G]),
streams the group's keys and values of its split from the cache in place, and keeps an online softmax
(running max, sum and weighted values). Each split writes its normalised partial output and its
log-sum-exp; the caller combines the splits. Row lengths are read from device memory, so a decode
step needs no host sync and the launch (grid and arguments) is the same at every step: a CUDA
graph can replay it.

    seq_len[b]  keys row b attends to (the new token's included); its query position is seq_len - 1
    window      > 0: only keys j with query_position - j < window (sliding-window layers)
"""

import triton
import triton.language as tl


@triton.jit
def decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, seq_len_ptr, out_ptr, lse_ptr,
    scale, window, split_size,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    IEEE: tl.constexpr,
):
    """out[b, h, split] = softmax-weighted values of this split's keys (normalised within the split),
    lse[b, h, split] = log of the split's softmax denominator (-inf for an empty split).
    HEAD_DIM is a power of two (>= 16): key and value tiles need only a row mask, which keeps the
    loop's loads pipelined.

    Both products are computed transposed, keys on the MMA's M side: scores^T = K q^T is
    [BLOCK_N, HEAD_DIM] x [HEAD_DIM, BLOCK_G] and out^T = V^T P^T is [HEAD_DIM, BLOCK_N] x
    [BLOCK_N, BLOCK_G]. The query heads of a group are then the N side, whose MMA granularity is 8:
    a group of 7 or 5 heads pads to 8 columns, where as the M side it would pad to 16 rows."""
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(seq_len_ptr + row).to(tl.int32)
    query_position = length - 1
    lo = split * split_size
    hi = tl.minimum(lo + split_size, length)
    if window > 0:
        lo = tl.maximum(lo, query_position - window + 1)

    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_mask[:, None], other=0.0)
    q_t = tl.trans(q)  # [HEAD_DIM, BLOCK_G]

    k_base = k_ptr + row * stride_kb + kv_head * stride_kh
    v_base = v_ptr + row * stride_vb + kv_head * stride_vh
    running_max = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc_t = tl.zeros((HEAD_DIM, BLOCK_G), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=n_mask[:, None],
                    other=0.0)
        if IEEE:
            scores_t = tl.dot(k, q_t, input_precision="ieee")
        else:
            scores_t = tl.dot(k, q_t)
        scores_t = tl.where(n_mask[:, None], scores_t * scale, float("-inf"))  # [BLOCK_N, BLOCK_G]
        new_max = tl.maximum(running_max, tl.max(scores_t, axis=0))
        probs_t = tl.exp(scores_t - new_max[None, :])
        correction = tl.exp(running_max - new_max)
        running_sum = running_sum * correction + tl.sum(probs_t, axis=0)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=n_mask[:, None],
                    other=0.0)  # [BLOCK_N, HEAD_DIM], rows contiguous: asynchronous copies stay possible
        if IEEE:
            acc_t = acc_t * correction[None, :] + tl.dot(tl.trans(v.to(tl.float32)), probs_t, input_precision="ieee")
        else:
            acc_t = acc_t * correction[None, :] + tl.dot(tl.trans(v), probs_t.to(v.dtype))
        running_max = new_max

    empty = running_sum == 0.0
    out_t = acc_t / tl.where(empty, 1.0, running_sum)[None, :]
    lse = tl.where(empty, float("-inf"), running_max + tl.log(tl.where(empty, 1.0, running_sum)))
    out_ptrs = out_ptr + row * stride_ob + heads[None, :] * stride_oh + split * stride_os + offs_d[:, None] * stride_od
    tl.store(out_ptrs, out_t, mask=g_mask[None, :])
    tl.store(lse_ptr + row * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=g_mask)
