"""Triton kernels for NF4 weights (bitsandbytes layout; see abs_fast/quant/nf4.py for the format).

    dequantize   out[i] = code[nibble(i)] * absmax[i >> log2(blocksize)]
                 with double quantisation: absmax[b] = code2[q[b]] * absmax2[b >> 8] + offset

Element 2j sits in the high nibble of byte j, element 2j+1 in the low nibble. Products are fp32 and
rounded once to the output dtype, as bitsandbytes computes them; launch with enable_fp_fusion=False
so the nested scale is a multiply then an add (an FMA would round differently from bitsandbytes).

    decode matmul   few rows (decode) times an NF4 weight, split-K, with the LoRA epilogue
                    (`nf4_decode_matmul_kernel`)

The training GEMM with NF4 decoded inside its K-loop is `lora_fused_matmul_kernel` (kernels/lora.py, W_NF4).
"""

import triton
import triton.language as tl


@triton.jit
def nf4_dequantize_kernel(
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, out_ptr,
    numel,
    BLOCKSIZE_LOG2: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK_BYTES: tl.constexpr,
):
    """Each program decodes BLOCK_BYTES packed bytes into 2 * BLOCK_BYTES contiguous outputs."""
    pid = tl.program_id(0).to(tl.int64)
    offs_byte = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    byte_mask = offs_byte < (numel + 1) // 2
    packed = tl.load(packed_ptr + offs_byte, mask=byte_mask, other=0).to(tl.int32)
    nibbles = tl.interleave(packed >> 4, packed & 0xF)  # [2 * BLOCK_BYTES]: element 2j, 2j+1, ...
    offs = pid * (2 * BLOCK_BYTES) + tl.arange(0, 2 * BLOCK_BYTES)
    mask = offs < numel
    block = offs >> BLOCKSIZE_LOG2
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q) * tl.load(nested_absmax_ptr + (block >> 8), mask=mask, other=0.0)
        scale = scale + tl.load(nested_offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    values = tl.load(code_ptr + nibbles) * scale
    tl.store(out_ptr + offs, values.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T", "k_per_split"])  # the row count and the split follow the batch
def nf4_decode_matmul_kernel(
    x_ptr, packed_ptr, scale_ptr, code_ptr, bias_ptr, l_ptr, ids_ptr, b_ptr, out_ptr,
    T, N, K, R, n_adapters, k_per_split,
    stride_xm, stride_xk,
    stride_lm, stride_lr,
    stride_ba, stride_bn, stride_br,
    stride_os, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCKSIZE_LOG2: tl.constexpr, LORA_PRECISION: tl.constexpr, BASE_IEEE: tl.constexpr,
):
    """out[split, t, n] = sum over this split's K range of x[t] * W[n] (+ on split 0: bias[n] and the
    LoRA expand l[t, :R] @ B[ids[t], n, :R]), W in NF4 stored row-major [N, K].

    For few rows (decode) every row shares one M tile, so W is read once; split-K fills the GPU.
    BLOCK_K divides the NF4 blocksize and K, so a weight row has one scale per K step: the scale is
    a [BLOCK_N] vector per step (not a gather per element), and the packed bytes of a row are
    contiguous (BLOCK_K / 2 bytes, split into high and low nibbles). With one split the result is
    written in out's dtype directly; otherwise the caller sums the fp32 splits (deterministic).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_m = tl.cdiv(T, BLOCK_M)
    pid_m = pid % num_pid_m  # the M tiles of one weight tile run together: W comes from HBM once
    pid_n = pid // num_pid_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < T
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        if split == 0:
            offs_r = tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            lo = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                         mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            ids = tl.load(ids_ptr + offs_m, mask=m_mask, other=-1)
            for adapter in range(0, n_adapters):
                mine = tl.where((ids == adapter)[:, None], lo, 0.0)
                b = tl.load(b_ptr + adapter * stride_ba + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                            mask=r_mask[:, None] & n_mask[None, :], other=0.0)
                acc = tl.dot(mine, b.to(tl.float32), acc, input_precision=LORA_PRECISION)
    offs_kh = tl.arange(0, BLOCK_K // 2)
    offs_k = tl.arange(0, BLOCK_K)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    row_start = offs_n.to(tl.int64) * K  # flat index of each weight row's first element
    for k0 in range(k_start, k_end, BLOCK_K):
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                    mask=m_mask[:, None], other=0.0)
        flat = row_start + k0
        packed = tl.load(packed_ptr + (flat >> 1)[:, None] + offs_kh[None, :], mask=n_mask[:, None], other=0)
        high = (packed >> 4).to(tl.int32)
        low = (packed & 0xF).to(tl.int32)
        nibbles = tl.reshape(tl.join(high, low), (BLOCK_N, BLOCK_K))  # element 2j high, 2j + 1 low
        scale = tl.load(scale_ptr + (flat >> BLOCKSIZE_LOG2), mask=n_mask, other=0.0)
        w = (tl.load(code_ptr + nibbles) * scale[:, None]).to(x_ptr.dtype.element_ty)
        if BASE_IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        if split == 0:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
