"""Triton decode attention over a per-row KV cache, GQA without copies (flash-decoding).

One program per (row, KV head, key split): it loads the G query heads of the group once ([G, D]),
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
    loop's loads pipelined."""
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

    k_base = k_ptr + row * stride_kb + kv_head * stride_kh
    v_base = v_ptr + row * stride_vb + kv_head * stride_vh
    running_max = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=n_mask[:, None],
                    other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(n_mask[None, :], scores * scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        probs = tl.exp(scores - new_max[:, None])
        correction = tl.exp(running_max - new_max)
        running_sum = running_sum * correction + tl.sum(probs, axis=1)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=n_mask[:, None],
                    other=0.0)
        if IEEE:
            acc = acc * correction[:, None] + tl.dot(probs, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v)
        running_max = new_max

    empty = running_sum == 0.0
    out = acc / tl.where(empty, 1.0, running_sum)[:, None]
    lse = tl.where(empty, float("-inf"), running_max + tl.log(tl.where(empty, 1.0, running_sum)))
    out_ptrs = out_ptr + row * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :] * stride_od
    tl.store(out_ptrs, out, mask=g_mask[:, None])
    tl.store(lse_ptr + row * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=g_mask)
