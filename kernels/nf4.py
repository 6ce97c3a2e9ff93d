"""Triton kernels for NF4 weights (bitsandbytes layout; see abs_fast/quant/nf4.py for the format).

    dequantize   out[i] = code[nibble(i)] * absmax[i >> log2(blocksize)]
                 with double quantisation: absmax[b] = code2[q[b]] * absmax2[b >> 8] + offset

Element 2j sits in the high nibble of byte j, element 2j+1 in the low nibble. Products are fp32 and
rounded once to the output dtype, as bitsandbytes computes them; launch with enable_fp_fusion=False
so the nested scale is a multiply then an add (an FMA would round differently from bitsandbytes).

The GEMM with NF4 decoded inside its K-loop is `lora_fused_matmul_kernel` (kernels/lora.py, W_NF4).
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
