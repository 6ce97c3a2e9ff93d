"""Compile every Triton kernel variant abs-fast launches for real GPU targets, without a GPU.

The interpreter checks what the kernels compute; this checks that the compiler accepts them for
sm_80 (A100) and sm_90 (H100), with the specialisation the JIT applies at launch
(unit strides become constants, pointers and strides divisible by 16 are marked so), and that the
base GEMM's K loop is software-pipelined (asynchronous copies) rather than a plain load loop; and
that every kernel can launch within the 99 KB of shared memory of consumer cards (sm_86, sm_89).
Uses the ptxas that ships inside the triton wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

COMPILE_HELPERS = textwrap.dedent(r"""
    import json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from abs_fast.kernels import attention as k_attention
    from abs_fast.kernels import logprobs as k_logprobs
    from abs_fast.kernels import lora as k
    from abs_fast.kernels import nf4 as k_nf4

    def compile_kernel(fn, pointer_types, constexprs, arch, num_warps=8, num_stages=3):
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in pointer_types:  # pointers, and the few float scalars
                signature[name] = pointer_types[name]
                if pointer_types[name].startswith("*"):
                    attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are aligned
            else:
                signature[name] = "i32"
                if name.startswith("stride") or name in ("N", "K", "D"):
                    # what the JIT marks at launch for Qwen2.5 shapes: every dim is a multiple of 16
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
""")

COMPILE_SCRIPT = COMPILE_HELPERS + textwrap.dedent(r"""
    arch, dtype = int(sys.argv[1]), sys.argv[2]
    act = "*" + dtype
    plan = {"sorted_idx_ptr": "*i32", "tile_adapter_ptr": "*i32", "tile_start_ptr": "*i32", "tile_end_ptr": "*i32"}
    precision = "ieee" if dtype == "fp32" else "tf32"
    report = {}
    w_extra = {"w_code_ptr": "*fp32", "w_scale_ptr": "*fp32"}
    fused_common = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64 if dtype != "fp32" else 32, BLOCK_R=16, GROUP_M=8,
                        LORA_PRECISION=precision, BASE_IEEE=dtype == "fp32", W_NF4=False, W_BLOCKSIZE_LOG2=6,
                        W_INDEX_I64=False)
    # forward: W [N, K] row-major (stride_wk = 1), bias, LoRA expand from fp32 S'
    fwd = compile_kernel(k.lora_fused_matmul_kernel,
                         {"x_ptr": act, "w_ptr": act, **w_extra, "bias_ptr": act, "l_ptr": "*fp32", "q_ptr": "*fp32",
                          "out_ptr": act, **plan},
                         dict(fused_common, HAS_BIAS=True, HAS_LORA=True, stride_xk=1, stride_wk=1, stride_on=1,
                              stride_lr=1, stride_qr=1), arch)
    # backward dX: reads W^T from W's storage (stride_wn = 1), expand from dS through A^T
    bwd = compile_kernel(k.lora_fused_matmul_kernel,
                         {"x_ptr": act, "w_ptr": act, **w_extra, "bias_ptr": act, "l_ptr": "*fp32", "q_ptr": "*fp32",
                          "out_ptr": act, **plan},
                         dict(fused_common, HAS_BIAS=False, HAS_LORA=True, stride_xk=1, stride_wn=1, stride_on=1,
                              stride_lr=1, stride_qn=1), arch)
    base_only = compile_kernel(k.lora_fused_matmul_kernel,
                               {"x_ptr": act, "w_ptr": act, **w_extra, "bias_ptr": act, "l_ptr": "*fp32",
                                "q_ptr": "*fp32", "out_ptr": act, **plan},
                               dict(fused_common, HAS_BIAS=False, HAS_LORA=False, stride_xk=1, stride_wk=1,
                                    stride_on=1), arch)
    # NF4 base decoded in the K-loop: forward reads W, backward reads W^T, from the same packed bytes
    nf4_ptrs = {"x_ptr": act, "w_ptr": "*u8", **w_extra, "bias_ptr": act, "l_ptr": "*fp32", "q_ptr": "*fp32",
                "out_ptr": act, **plan}
    nf4_fwd = compile_kernel(k.lora_fused_matmul_kernel, nf4_ptrs,
                             dict(fused_common, HAS_BIAS=False, HAS_LORA=True, W_NF4=True, stride_xk=1, stride_wk=1,
                                  stride_on=1, stride_lr=1, stride_qr=1), arch)
    nf4_bwd = compile_kernel(k.lora_fused_matmul_kernel, nf4_ptrs,
                             dict(fused_common, HAS_BIAS=False, HAS_LORA=True, W_NF4=True, stride_xk=1, stride_wn=1,
                                  stride_on=1, stride_lr=1, stride_qn=1), arch)
    for double_quant in (True, False):
        compile_kernel(k_nf4.nf4_dequantize_kernel,
                       {"packed_ptr": "*u8", "absmax_ptr": "*u8" if double_quant else "*fp32", "code_ptr": "*fp32",
                        "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "nested_offset_ptr": "*fp32",
                        "out_ptr": act},
                       dict(BLOCKSIZE_LOG2=6, DOUBLE_QUANT=double_quant, BLOCK_BYTES=1024), arch, num_warps=4,
                       num_stages=1)
    for split_k in (1, 4):
        compile_kernel(k.lora_shrink_kernel,
                       {"x_ptr": act, "p_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": "*fp32", **plan},
                       dict(BLOCK_M=128, BLOCK_R=16, BLOCK_K=32, SPLIT_K=split_k, LORA_PRECISION=precision,
                            stride_xk=1, stride_pk=1, stride_or=1), arch, num_warps=4, num_stages=2)
    compile_kernel(k.lora_segment_grad_kernel,
                   {"l_ptr": "*fp32", "r_ptr": act, "out_ptr": "*fp32", "sorted_idx_ptr": "*i32",
                    "seg_start_ptr": "*i32", "seg_count_ptr": "*i32"},
                   dict(BLOCK_M=128, BLOCK_R=16, BLOCK_D=64, LORA_PRECISION=precision, stride_lr=1, stride_rd=1,
                        stride_od=1), arch, num_warps=4, num_stages=2)
    # token log-probs: the launch configuration of ops/logprobs.py on a GPU (4 warps, 3 stages, the JIT's defaults)
    logprob_ptrs = {"h_ptr": act, "w_ptr": act, "target_ptr": "*i64", "inv_temperature": "fp32"}
    stats = compile_kernel(k_logprobs.token_stats_kernel,
                           {**logprob_ptrs, "max_ptr": "*fp32", "sumexp_ptr": "*fp32", "sumexp_logit_ptr": "*fp32",
                            "target_logit_ptr": "*fp32"},
                           dict(V_PER_SPLIT=1280, BLOCK_T=64, BLOCK_V=128, BLOCK_K=64, IEEE=dtype == "fp32",
                                stride_hk=1, stride_wk=1),
                           arch, num_warps=4)
    grads = compile_kernel(k_logprobs.token_grad_chunk_kernel,
                           {**logprob_ptrs, "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "dlogp_ptr": "*fp32",
                            "dentropy_ptr": "*fp32", "g_ptr": "*fp32" if dtype == "fp32" else act},
                           dict(V_CHUNK=8192, HAS_ENTROPY=True, BLOCK_T=64, BLOCK_V=128, BLOCK_K=64,
                                IEEE=dtype == "fp32", stride_hk=1, stride_wk=1, stride_gv=1), arch, num_warps=4)
    # decode: the NF4 split-K matmul with its LoRA epilogue, and the flash-decoding attention
    decode_ptrs = {"x_ptr": act, "packed_ptr": "*u8", "scale_ptr": "*fp32", "code_ptr": "*fp32", "bias_ptr": act,
                   "l_ptr": "*fp32", "ids_ptr": "*i32", "b_ptr": "*fp32", "out_ptr": "*fp32"}
    nf4_decode = compile_kernel(k_nf4.nf4_decode_matmul_kernel, decode_ptrs,
                                dict(HAS_BIAS=True, HAS_LORA=True, SPLIT_K=4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64,
                                     BLOCK_R=16, BLOCKSIZE_LOG2=6, LORA_PRECISION=precision,
                                     BASE_IEEE=dtype == "fp32", stride_xk=1, stride_lr=1, stride_br=1, stride_on=1),
                                arch, num_warps=4, num_stages=3)
    decode_attention = compile_kernel(k_attention.decode_attention_kernel,
                                      {"q_ptr": act, "k_ptr": act, "v_ptr": act, "seq_len_ptr": "*i32",
                                       "out_ptr": "*fp32", "lse_ptr": "*fp32", "scale": "fp32"},
                                      dict(GROUP=7, BLOCK_G=16, BLOCK_N=64, HEAD_DIM=128, IEEE=dtype == "fp32",
                                           stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1),
                                      arch, num_warps=4, num_stages=3)
    for name, kernel in (("fwd", fwd), ("bwd", bwd), ("base_only", base_only), ("nf4_fwd", nf4_fwd),
                         ("nf4_bwd", nf4_bwd), ("logprob_stats", stats), ("logprob_grad", grads),
                         ("nf4_decode", nf4_decode), ("decode_attention", decode_attention)):
        report[name] = {"ptx": kernel.asm["ptx"], "shared": kernel.metadata.shared}
    print(json.dumps({name: {"async": r["ptx"].count("cp.async"),
                             "mma": len(re.findall(r"\b(?:wgmma|mma)\.", r["ptx"])),
                             "shared": r["shared"]} for name, r in report.items()}))
""")


# Consumer Ampere / Ada cards (sm_86, sm_89: RTX 3090, 4090, the consumer-24gb preset) give a block
# at most 99 KB of shared memory, against 163 KB on A100 and 227 KB on H100.
CONSUMER_SCRIPT = COMPILE_HELPERS + textwrap.dedent(r"""
    from abs_fast.ops.lora import FUSED_MATMUL_CONFIGS

    arch = int(sys.argv[1])
    plan = {"sorted_idx_ptr": "*i32", "tile_adapter_ptr": "*i32", "tile_start_ptr": "*i32", "tile_end_ptr": "*i32"}
    report = {}
    for nf4 in (False, True):
        ptrs = {"x_ptr": "*bf16", "w_ptr": "*u8" if nf4 else "*bf16", "w_code_ptr": "*fp32", "w_scale_ptr": "*fp32",
                "bias_ptr": "*bf16", "l_ptr": "*fp32", "q_ptr": "*fp32", "out_ptr": "*bf16", **plan}
        for block_m in (16, 128):  # decode and prefill/training tiles; rank 64 (BLOCK_R 64) is the largest LoRA tile
            report[f"fused nf4={nf4} BLOCK_M={block_m}"] = [
                compile_kernel(k.lora_fused_matmul_kernel, ptrs,
                               dict(BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=64, GROUP_M=8,
                                    LORA_PRECISION="tf32", BASE_IEEE=False, W_NF4=nf4, W_BLOCKSIZE_LOG2=6,
                                    W_INDEX_I64=False, HAS_BIAS=False, HAS_LORA=True, stride_xk=1, stride_wk=1,
                                    stride_on=1, stride_lr=1, stride_qr=1), arch, num_warps=w, num_stages=st
                               ).metadata.shared
                for bn, bk, w, st in FUSED_MATMUL_CONFIGS]
    # the kernels launched with one configuration (ops/*.py), at their largest tiles
    report["shrink"] = [compile_kernel(k.lora_shrink_kernel,
                                       {"x_ptr": "*bf16", "p_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": "*fp32",
                                        **plan},
                                       dict(BLOCK_M=128, BLOCK_R=64, BLOCK_K=32, SPLIT_K=1, LORA_PRECISION="tf32",
                                            stride_xk=1, stride_pk=1, stride_or=1), arch, num_warps=4
                                       ).metadata.shared]
    report["segment_grad"] = [compile_kernel(k.lora_segment_grad_kernel,
                                             {"l_ptr": "*fp32", "r_ptr": "*bf16", "out_ptr": "*fp32",
                                              "sorted_idx_ptr": "*i32", "seg_start_ptr": "*i32",
                                              "seg_count_ptr": "*i32"},
                                             dict(BLOCK_M=128, BLOCK_R=64, BLOCK_D=64, LORA_PRECISION="tf32",
                                                  stride_lr=1, stride_rd=1, stride_od=1), arch, num_warps=4
                                             ).metadata.shared]
    report["nf4_decode"] = [compile_kernel(
        k_nf4.nf4_decode_matmul_kernel,
        {"x_ptr": "*bf16", "packed_ptr": "*u8", "scale_ptr": "*fp32", "code_ptr": "*fp32", "bias_ptr": "*bf16",
         "l_ptr": "*fp32", "ids_ptr": "*i32", "b_ptr": "*fp32", "out_ptr": "*fp32"},
        dict(HAS_BIAS=True, HAS_LORA=True, SPLIT_K=4, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, BLOCK_R=64,
             BLOCKSIZE_LOG2=6, LORA_PRECISION="tf32", BASE_IEEE=False, stride_xk=1, stride_lr=1, stride_br=1,
             stride_on=1), arch, num_warps=8 if block_m >= 128 else 4, num_stages=3).metadata.shared
        for block_m in (128,)]
    report["decode_attention"] = [compile_kernel(
        k_attention.decode_attention_kernel,
        {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "seq_len_ptr": "*i32", "out_ptr": "*fp32",
         "lse_ptr": "*fp32", "scale": "fp32"},
        dict(GROUP=8, BLOCK_G=16, BLOCK_N=64, HEAD_DIM=128, IEEE=False, stride_qd=1, stride_kd=1, stride_vd=1,
             stride_od=1), arch, num_warps=4, num_stages=3).metadata.shared]
    for act in ("bf16", "fp32"):
        common = {"h_ptr": "*" + act, "w_ptr": "*" + act, "target_ptr": "*i64", "inv_temperature": "fp32"}
        report[f"logprob_stats {act}"] = [compile_kernel(
            k_logprobs.token_stats_kernel, {**common, "max_ptr": "*fp32", "sumexp_ptr": "*fp32",
                                            "sumexp_logit_ptr": "*fp32", "target_logit_ptr": "*fp32"},
            dict(V_PER_SPLIT=1280, BLOCK_T=64, BLOCK_V=128, BLOCK_K=64, IEEE=act == "fp32", stride_hk=1,
                 stride_wk=1), arch, num_warps=4).metadata.shared]
        report[f"logprob_grad {act}"] = [compile_kernel(
            k_logprobs.token_grad_chunk_kernel, {**common, "lse_ptr": "*fp32", "entropy_ptr": "*fp32",
                                                 "dlogp_ptr": "*fp32", "dentropy_ptr": "*fp32", "g_ptr": "*" + act},
            dict(V_CHUNK=8192, HAS_ENTROPY=True, BLOCK_T=64, BLOCK_V=128, BLOCK_K=64, IEEE=act == "fp32",
                 stride_hk=1, stride_wk=1, stride_gv=1), arch, num_warps=4).metadata.shared]
    print(json.dumps(report))
""")

CONSUMER_SHARED_BYTES = 99 * 1024


def _ptxas_available() -> bool:
    try:
        import triton.knobs

        return os.path.isfile(triton.knobs.nvidia.ptxas.path)
    except (ImportError, AttributeError, RuntimeError):
        return False


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpu_targets(arch, dtype):
    if not _ptxas_available():
        pytest.skip("triton's CUDA backend (ptxas) is not available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, str(arch), dtype], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    import json

    report = json.loads(result.stdout.strip().splitlines()[-1])
    for name, stats in report.items():
        if dtype == "bf16":
            assert stats["mma"] > 0, f"{name}: no tensor-core instructions for sm_{arch} {dtype}"
        else:  # fp32 models (tf32 off, torch's default) get exact FMA products, not tf32 tensor-core ones
            assert stats["mma"] == 0, f"{name}: fp32 products on tensor cores (tf32 rounding) for sm_{arch}"
        assert stats["async"] > 0, f"{name}: the K loop is not pipelined (no asynchronous copies) on sm_{arch}"


@pytest.mark.parametrize("arch", [86, 89])
def test_kernels_fit_consumer_gpu_shared_memory(arch):
    """Every kernel has a launch configuration within 99 KB of shared memory on consumer cards: the
    autotuned fused matmul at least one of its configurations, the others their only one."""
    if not _ptxas_available():
        pytest.skip("triton's CUDA backend (ptxas) is not available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", CONSUMER_SCRIPT, str(arch)], capture_output=True, text=True,
                            env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    import json

    report = json.loads(result.stdout.strip().splitlines()[-1])
    for name, shared in report.items():
        assert min(shared) <= CONSUMER_SHARED_BYTES, f"{name}: needs {min(shared)} B of shared memory on sm_{arch}"
