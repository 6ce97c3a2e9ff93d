"""Triton kernels of the fused multi-adapter LoRA linear, forward and backward.

Every token t belongs to one adapter a = adapter_ids[t] (or none, a = -1). Tokens are grouped by
adapter through a stable sorted index (activations are never permuted in memory: rows are gathered
through the index and results scattered back), and cut into M tiles that each belong to exactly one
adapter (see `abs_fast.ops.lora_linear.SegmentPlan`). Three kernels serve both directions:

    shrink        L[t] = scale[a] * X[t] @ P[a]^T            fwd: S' = s*X A^T     bwd: dS = s*dY B
    fused matmul  O[t] = X[t] @ W^T (+ bias) + L[t] @ Q[a]^T fwd: Y = XW^T + S'B^T bwd: dX = dY W + dS A
    segment grad  G[a] = sum over tokens of a: L[t]^T R[t]   dA = dS^T X,  dB^T = S'^T dY

The LoRA expand term initialises the base GEMM's fp32 accumulator, so the output is written once.
LoRA-side products (shrink, expand, segment grads) run in fp32 (tf32 on tensor cores for 16-bit
models, IEEE for fp32 models); the base product runs in the model's dtype with fp32 accumulation.
Tiles whose adapter is -1 skip all adapter work; padding tiles (adapter -2) do nothing.

With W_NF4 the fused matmul reads the base weight as NF4 (packed bytes, the 16-entry code table and
one fp32 scale per block) and decodes each weight tile inside the K-loop: code * scale in fp32,
rounded to the activations' dtype, exactly as a separate dequantisation would produce it. Elements
are addressed by their flat index in W's row-major storage, so forward (W) and backward (W^T) read
the same packed bytes, and no dense copy of W ever exists.
"""

import triton
import triton.language as tl


# Values that follow the batch (tile counts, split counts) are run-time arguments Triton must not
# specialise on, so one compiled variant serves every token count.
@triton.jit(do_not_specialize=["split_k"])
def lora_shrink_kernel(
    x_ptr, p_ptr, scale_ptr, out_ptr,
    sorted_idx_ptr, tile_adapter_ptr, tile_start_ptr, tile_end_ptr,
    K, R, split_k,
    stride_xm, stride_xk,
    stride_pa, stride_pr, stride_pk,
    stride_os, stride_om, stride_or,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
    """out[split, t, :R] = scale[a] * x[t, K range of split] @ p[a, :R, same range]^T for the rows of
    one adapter tile: each of the split_k splits writes its own partial, which the caller sums
    (deterministic: no atomics)."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    adapter = tl.load(tile_adapter_ptr + tile)
    if adapter >= 0:
        start = tl.load(tile_start_ptr + tile)
        end = tl.load(tile_end_ptr + tile)
        offs_m = start + tl.arange(0, BLOCK_M)
        row_mask = offs_m < end
        rows = tl.load(sorted_idx_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        p_base = p_ptr + adapter.to(tl.int64) * stride_pa
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(split * BLOCK_K, K, split_k * BLOCK_K):
            kk = k0 + offs_k
            k_mask = kk < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            p = tl.load(p_base + offs_r[None, :] * stride_pr + kk[:, None] * stride_pk,
                        mask=(offs_r[None, :] < R) & k_mask[:, None], other=0.0)
            acc = tl.dot(x.to(tl.float32), p.to(tl.float32), acc, input_precision=LORA_PRECISION)
        acc = acc * tl.load(scale_ptr + adapter)
        out_ptrs = out_ptr + split * stride_os + rows[:, None] * stride_om + offs_r[None, :] * stride_or
        tl.store(out_ptrs, acc, mask=row_mask[:, None] & (offs_r[None, :] < R))


@triton.jit(do_not_specialize=["num_tiles"])
def lora_fused_matmul_kernel(
    x_ptr, w_ptr, w_code_ptr, w_scale_ptr, bias_ptr, l_ptr, q_ptr, out_ptr,
    sorted_idx_ptr, tile_adapter_ptr, tile_start_ptr, tile_end_ptr,
    num_tiles, N, K, R,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_lm, stride_lr,
    stride_qa, stride_qn, stride_qr,
    stride_om, stride_on,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, LORA_PRECISION: tl.constexpr, BASE_IEEE: tl.constexpr,
    W_NF4: tl.constexpr = False, W_BLOCKSIZE_LOG2: tl.constexpr = 6, W_INDEX_I64: tl.constexpr = False,
):
    """out[t, n] = x[t] @ w[n]^T (+ bias[n]) + l[t, :R] @ q[a, n, :R]^T, one tile of one adapter.

    w is addressed through (stride_wn, stride_wk), so the backward pass reads W^T from W's storage.
    With W_NF4, w_ptr holds packed NF4 bytes and (stride_wn, stride_wk) are element strides of the
    flat row-major weight; w_code_ptr is the 16-entry code table, w_scale_ptr the fp32 block scales.
    """
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M consecutive M tiles sweep the N tiles together, so a weight tile is
    # reused from L2 by several row tiles before it is evicted.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_tiles - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    adapter = tl.load(tile_adapter_ptr + pid_m)
    if adapter >= -1:
        start = tl.load(tile_start_ptr + pid_m)
        end = tl.load(tile_end_ptr + pid_m)
        offs_m = start + tl.arange(0, BLOCK_M)
        row_mask = offs_m < end
        rows = tl.load(sorted_idx_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_LORA:
            if adapter >= 0:
                offs_r = tl.arange(0, BLOCK_R)
                r_mask = offs_r < R
                lo = tl.load(l_ptr + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                             mask=row_mask[:, None] & r_mask[None, :], other=0.0)
                q = tl.load(q_ptr + adapter.to(tl.int64) * stride_qa + offs_r[:, None] * stride_qr
                            + offs_n[None, :] * stride_qn,
                            mask=r_mask[:, None] & n_mask[None, :], other=0.0)
                acc = tl.dot(lo.to(tl.float32), q.to(tl.float32), acc, input_precision=LORA_PRECISION)
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        if W_NF4:
            if W_INDEX_I64:
                w_flat = offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None].to(tl.int64) * stride_wk
            else:
                w_flat = offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        else:
            w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + offs_k) < K
            x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_mask = k_mask[:, None] & n_mask[None, :]
            if W_NF4:
                packed = tl.load(w_ptr + (w_flat >> 1), mask=w_mask, other=0)
                nibble = tl.where((w_flat & 1) == 0, packed >> 4, packed & 0xF).to(tl.int32)
                scale = tl.load(w_scale_ptr + (w_flat >> W_BLOCKSIZE_LOG2), mask=w_mask, other=0.0)
                w = (tl.load(w_code_ptr + nibble) * scale).to(x_ptr.dtype.element_ty)
                w_flat += BLOCK_K * stride_wk
            else:
                w = tl.load(w_ptrs, mask=w_mask, other=0.0)
                w_ptrs += BLOCK_K * stride_wk
            if BASE_IEEE:  # fp32 models without tf32: exact products, as torch does by default
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
            x_ptrs += BLOCK_K * stride_xk
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["SPLITS"])
def lora_segment_grad_kernel(
    l_ptr, r_ptr, out_ptr,
    sorted_idx_ptr, seg_start_ptr, seg_count_ptr,
    D, R, SPLITS,
    stride_lm, stride_lr,
    stride_rm, stride_rd,
    stride_os, stride_oa, stride_or, stride_od,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    LORA_PRECISION: tl.constexpr,
):
    """out[split, a, :R, d] = sum over a's tokens in this split of l[t, :R]^T r[t, d], fp32.

    Each split walks every SPLITS-th M block of the adapter's segment; the caller sums the splits
    (deterministic, no atomics).
    """
    pid_d = tl.program_id(0)
    adapter = tl.program_id(1)
    split = tl.program_id(2)
    seg_start = tl.load(seg_start_ptr + adapter)
    seg_count = tl.load(seg_count_ptr + adapter)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    r_mask = offs_r < R
    d_mask = offs_d < D
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for m0 in range(split * BLOCK_M, seg_count, SPLITS * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_mask = offs_m < seg_count
        rows = tl.load(sorted_idx_ptr + seg_start + offs_m, mask=row_mask, other=0).to(tl.int64)
        lo = tl.load(l_ptr + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                     mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        ri = tl.load(r_ptr + rows[:, None] * stride_rm + offs_d[None, :] * stride_rd,
                     mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(lo.to(tl.float32)), ri.to(tl.float32), acc, input_precision=LORA_PRECISION)
    out_ptrs = (out_ptr + split * stride_os + adapter * stride_oa
                + offs_r[:, None] * stride_or + offs_d[None, :] * stride_od)
    tl.store(out_ptrs, acc, mask=r_mask[:, None] & d_mask[None, :])
