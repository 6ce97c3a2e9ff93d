"""Triton kernels for NF4 weights (bitsandbytes layout; see abs_fast/quant/nf4.py for the format).

    dequantize   out[i] = code[nibble(i)] * absmax[i >> log2(blocksize)]
                 with double quantisation: absmax[b] = code2[q[b]] * absmax2[b >> 8] + offset

Element 2j sits in the high nibble of byte j, element 2j+1 in the low nibble. Products are fp32 and
rounded once to the output dtype, as bitsandbytes computes them; launch with enable_fp_fusion=False
so the nested scale is a multiply then an add (an FMA would round differently from bitsandbytes).

    decode matmul   few rows (decode) times an NF4 weight, split-K, with the LoRA epilogue
                    (`nf4_decode_matmul_kernel`); on a GPU the codes decode in registers

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


def nf4_register_decode(code_bits) -> tuple[str, tuple[int, int, int, int]]:
    """PTX for tl.inline_asm_elementwise with pack=4 that decodes NF4 in registers, and the four
    table words it takes as operands. Four packed bytes in ($4, byte 0 lowest), out the code values
    of their high nibbles ($0, $1: the even elements) and of their low nibbles ($2, $3: the odd
    elements), 16 bits each, two to a register, the lower byte's value in the low half. `code_bits`
    are the 16 code values as bit patterns of the activations' 16-bit format (bf16 or fp16).

    A 16-entry byte table is two prmt lookups, entries 0-7 and 8-15 selected by a nibble's low three
    bits, and a byte select on its bit 3 (prmt's sign mode spreads that bit over the byte): once for
    the values' high bytes, once for their low bytes, then two prmt interleave them. No memory is
    read. prmt takes one table register and one immediate: the four register halves of the tables
    (entries 0-3 and 8-11 of the high and the low bytes) are the returned words, which the kernel
    passes as operands ($5, $9, $13, $17: pack=4 gives each 32-bit operand four slots)."""
    if len(code_bits) != 16 or any(not 0 <= v < 1 << 16 for v in code_bits):
        raise ValueError("code_bits must be 16 values of 16 bits")

    def table(byte_of):  # four words of byte entries 0-3, 4-7, 8-11, 12-15
        return [sum(byte_of(code_bits[4 * w + i]) << (8 * i) for i in range(4)) for w in range(4)]

    high, low = table(lambda v: v >> 8), table(lambda v: v & 0xFF)
    lines = [".reg .b32 z, t, idx, sel, ms, m, p, q, hb, lb, th1, th3, tl1, tl3;", "mov.b32 z, 0;",
             f"mov.b32 th1, {high[1]:#010x};", f"mov.b32 th3, {high[3]:#010x};",
             f"mov.b32 tl1, {low[1]:#010x};", f"mov.b32 tl3, {low[3]:#010x};"]

    def lookup(mask_source, out):
        # idx holds nibble i & 7 in byte i; idx | idx >> 12 puts bytes 0, 2, 1, 3 in selector fields
        # 0-3 (prmt reads the low 16 bits only), so the looked-up bytes and the mask come in that order
        return [
            "shr.b32 t, idx, 12;", "or.b32 sel, idx, t;",
            f"prmt.b32 m, {mask_source}, z, 0xB9A8;",  # 0xFF where the nibble's bit 3 is set, same order
            "prmt.b32 p, $5, th1, sel;", "prmt.b32 q, $9, th3, sel;", "lop3.b32 hb, p, q, m, 0xD8;",
            "prmt.b32 p, $13, tl1, sel;", "prmt.b32 q, $17, tl3, sel;", "lop3.b32 lb, p, q, m, 0xD8;",
            f"prmt.b32 {out[0]}, lb, hb, 0x6240;", f"prmt.b32 {out[1]}, lb, hb, 0x7351;",
        ]

    lines += ["shr.b32 t, $4, 4;", "and.b32 idx, t, 0x07070707;", *lookup("$4", ("$0", "$1"))]
    lines += ["and.b32 idx, $4, 0x07070707;", "shl.b32 ms, $4, 4;", *lookup("ms", ("$2", "$3"))]
    signed = tuple(w - (1 << 32) if w >= 1 << 31 else w for w in (high[0], high[2], low[0], low[2]))
    return "{\n" + "\n".join(lines) + "\n}", signed


@triton.jit(do_not_specialize=["T", "k_per_split"])  # the row count and the split follow the batch
def nf4_decode_matmul_kernel(
    x_ptr, packed_ptr, scale_ptr, code_ptr, bias_ptr, l_ptr, ids_ptr, b_ptr, out_ptr,
    T, N, K, R, n_adapters, k_per_split,
    word0, word1, word2, word3,
    stride_wn, stride_xm, stride_xk,
    stride_lm, stride_lr,
    stride_ba, stride_bn, stride_br,
    stride_os, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCKSIZE_LOG2: tl.constexpr, LORA_PRECISION: tl.constexpr, BASE_IEEE: tl.constexpr,
    DECODE_ASM: tl.constexpr,
):
    """out[split, t, n] = sum over this split's K range of x[t] * W[n] (+ on split 0: bias[n] and the
    LoRA expand l[t, :R] @ B[ids[t], n, :R]), W in NF4 stored row-major [N, K] (stride_wn bytes a row).

    Decode reads W once and has few rows, so the weight rows sit on the MMA's M side and the batch
    rows on its N side (granularity 8, not 16): acc is [BLOCK_N, BLOCK_T]. Split-K fills the GPU.
    A packed byte holds elements 2j (high nibble) and 2j + 1 (low nibble); the K step's product is
    taken as high-nibble weights times the even columns of x plus low-nibble weights times the odd
    ones, so each byte decodes elementwise into two same-shaped tensors, with no interleave. With
    DECODE_ASM (16-bit activations on a GPU: nf4_register_decode, with its table words word0-3) the
    codes are decoded in registers by prmt lookups, reading no memory; otherwise (fp32, the
    interpreter) each code is looked up in the 16 values at `code_ptr` (x's dtype) through
    tl.gather, whose 16 entries sit in distinct shared-memory banks. BLOCK_K divides the NF4
    blocksize, so each step's product is scaled per weight row after the dot (BLOCK_N x BLOCK_T
    multiplies, not one per weight element). With one split the result is written in out's dtype
    directly; otherwise the caller sums the fp32 splits (deterministic).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_t = tl.cdiv(T, BLOCK_T)
    pid_t = pid % num_pid_t  # the row tiles of one weight tile run together: W comes from HBM once
    pid_n = pid // num_pid_t
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask = offs_t < T
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    if HAS_LORA:
        if split == 0:
            offs_r = tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            lo_t = tl.load(l_ptr + offs_t[None, :] * stride_lm + offs_r[:, None] * stride_lr,
                           mask=r_mask[:, None] & t_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_T]
            ids = tl.load(ids_ptr + offs_t, mask=t_mask, other=-1)
            for adapter in range(0, n_adapters):
                mine = tl.where((ids == adapter)[None, :], lo_t, 0.0)
                b = tl.load(b_ptr + adapter * stride_ba + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                            mask=n_mask[:, None] & r_mask[None, :], other=0.0)
                acc = tl.dot(b.to(tl.float32), mine, acc, input_precision=LORA_PRECISION)
    code = tl.load(code_ptr + tl.arange(0, 16))
    # The register decode's table words as per-row values: left uniform (kernel arguments) ptxas copies
    # them into a register again at each use, ~1 instruction per weight element on sm_90. The test is
    # true for every row of a launched tile, but depends on the thread, so it cannot be folded away.
    every_row = (offs_n < N + BLOCK_N)[:, None]
    table0 = tl.where(every_row, word0, 0)
    table1 = tl.where(every_row, word1, 0)
    table2 = tl.where(every_row, word2, 0)
    table3 = tl.where(every_row, word3, 0)
    offs_kh = tl.arange(0, BLOCK_K // 2)
    offs_k = tl.arange(0, BLOCK_K)
    row_bytes = offs_n.to(tl.int64) * stride_wn
    row_flat = offs_n.to(tl.int64) * K  # flat index of each weight row's first element
    k_start = tl.multiple_of(split * k_per_split, BLOCK_K)  # the caller rounds k_per_split to BLOCK_K
    k_end = tl.minimum(k_start + k_per_split, K)
    for step in range(0, tl.cdiv(k_end - k_start, BLOCK_K)):
        k0 = k_start + step * BLOCK_K  # written from the step so the compiler sees its alignment (16-byte loads)
        x = tl.load(x_ptr + offs_t[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                    mask=t_mask[:, None], other=0.0)  # [BLOCK_T, BLOCK_K]
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_K // 2, 2)))
        packed = tl.load(packed_ptr + row_bytes[:, None] + (k0 // 2 + offs_kh)[None, :], mask=n_mask[:, None], other=0)
        if DECODE_ASM == "":
            byte = packed.to(tl.int32) & 0xFF
            high = tl.reshape(tl.gather(code, tl.reshape(byte >> 4, (BLOCK_N * BLOCK_K // 2,)), 0),
                              (BLOCK_N, BLOCK_K // 2))
            low = tl.reshape(tl.gather(code, tl.reshape(byte & 0xF, (BLOCK_N * BLOCK_K // 2,)), 0),
                             (BLOCK_N, BLOCK_K // 2))
        else:
            # out: 2 registers each for high and low; in: the packed bytes, then 4 slots per table word
            high, low = tl.inline_asm_elementwise(
                DECODE_ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r", [packed, table0, table1, table2, table3],
                dtype=(x_ptr.dtype.element_ty, x_ptr.dtype.element_ty), is_pure=True, pack=4)
        if BASE_IEEE:
            part = tl.dot(high, tl.trans(x_even), input_precision="ieee")
            part = tl.dot(low, tl.trans(x_odd), part, input_precision="ieee")
        else:
            part = tl.dot(high, tl.trans(x_even))
            part = tl.dot(low, tl.trans(x_odd), part)
        scale = tl.load(scale_ptr + ((row_flat + k0) >> BLOCKSIZE_LOG2), mask=n_mask, other=0.0)
        acc += part * scale[:, None]
    if HAS_BIAS:
        if split == 0:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + split * stride_os + offs_t[None, :] * stride_om + offs_n[:, None] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=t_mask[None, :] & n_mask[:, None])
