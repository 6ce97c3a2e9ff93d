// abs-fast native library: a small C ABI over raw pointers, loaded from Python with ctypes.
//
// The op (KERNELS.md), for rows t < T <= 16 of x [T, K] and a frozen NF4 weight W [N, K]:
//
//   y[t, n] = x[t] . W[n] (+ bias[n]) + sum_j S[t, j] * B[a, n, j],   S[t, j] = s[a] * x[t] . A[a, j]
//
// with a = adapter_ids[t] (-1 = base only). W is bitsandbytes NF4: flat row-major, element 2i in the
// high nibble of byte i, one scale per `blocksize` elements: absmax[b] (fp32), or with double
// quantisation nested_code[absmax_q[b]] * nested_absmax[b / 256] + *nested_offset.
// A is [n_adapters, R, K], B is [n_adapters, N, R], both fp32 and contiguous.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ABS_FAST_NATIVE_ABI 2
#define ABS_FAST_MAX_ROWS 16

// Errors (negative returns)
#define ABS_FAST_OK 0
#define ABS_FAST_EINVAL -1      // a size or pointer argument is out of range
#define ABS_FAST_EISA -2        // the requested instruction set is not supported by this CPU or build
#define ABS_FAST_ECUDA -3       // a CUDA launch failed (abs_fast_cuda_last_error() says why)
#define ABS_FAST_EALIGN -4      // the CUDA kernel needs K % 32 == 0 and blocksize >= 32

// Instruction sets of the CPU kernel
#define ABS_FAST_ISA_AUTO 0
#define ABS_FAST_ISA_SCALAR 1
#define ABS_FAST_ISA_AVX2 2
#define ABS_FAST_ISA_AVX512 3

int abs_fast_abi_version(void);
int abs_fast_cpu_best_isa(void);                 // what ABS_FAST_ISA_AUTO picks on this CPU
int abs_fast_cpu_isa_supported(int isa);          // 1 if this build and CPU can run `isa`
int abs_fast_cpu_max_threads(void);               // 1 when built without OpenMP
// threads a call of this size uses out of num_threads: 1 (no parallel region opens) below the minimum
// work per thread, which a loaded core would turn into waiting
int abs_fast_cpu_threads_for(int64_t rows, int64_t in_features, int64_t out_features, int num_threads);
long long abs_fast_cpu_parallel_regions(void);    // parallel regions opened by abs_fast_nf4_lora_cpu so far

int abs_fast_nf4_lora_cpu(
    const float* x, int64_t rows, int64_t in_features,
    const uint8_t* packed, int64_t out_features, int64_t blocksize,
    const float* absmax, const uint8_t* absmax_q, const float* nested_absmax, const float* nested_code,
    const float* nested_offset,
    const float* bias,
    const float* lora_a, const float* lora_b, const float* scaling, int64_t n_adapters, int64_t rank,
    const int32_t* adapter_ids,
    float* out,
    int isa, int num_threads);

// CUDA build only (libabs_fast_cuda): all pointers are device pointers; `stream` is a cudaStream_t
// (NULL = the legacy default stream). x and out have dtype `act_dtype` (0 fp32, 1 bf16, 2 fp16);
// bias too; A, B, scaling fp32. Requires in_features % 32 == 0 and blocksize >= 32.
int abs_fast_nf4_lora_cuda(
    const void* x, int act_dtype, int64_t rows, int64_t in_features,
    const uint8_t* packed, int64_t out_features, int64_t blocksize,
    const float* absmax, const uint8_t* absmax_q, const float* nested_absmax, const float* nested_code,
    const float* nested_offset,
    const void* bias,
    const float* lora_a, const float* lora_b, const float* scaling, int64_t n_adapters, int64_t rank,
    const int32_t* adapter_ids,
    float* shrunk_workspace,  // [rows, rank] fp32 device scratch
    void* out,
    void* stream);
const char* abs_fast_cuda_last_error(void);
int abs_fast_cuda_abi_version(void);

#ifdef __cplusplus
}
#endif
