// CUDA NF4 product for decode-time batches (T <= 16 input rows) with the multi-adapter LoRA epilogue.
//
// Decode is bandwidth-bound: the 4-bit weight is read once per call, so each warp owns a group of
// output rows and streams their packed bytes with 16-byte loads (32 NF4 codes per lane per step),
// decodes them against the 16-entry code table in shared memory, and multiplies them into every
// input row. Lanes reduce with warp shuffles; the LoRA expand (sum_j S[t, j] * B[a, n, j]) is added
// when a row is written. S = scaling[a] * x A[a]^T comes from a small shrink kernel launched first.
//
// Built only where nvcc exists; exposed through the C ABI in abs_fast_native.h (raw device pointers,
// loaded with ctypes), so it needs no CUDA build of torch to compile. Requires K % 32 == 0 and
// blocksize >= 32 (true for every Qwen2.5 / Llama / Mistral linear); other shapes use Triton.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>

#include "abs_fast_native.h"

namespace {

__constant__ float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f,
};

constexpr int kWarps = 8;        // warps per block
constexpr int kRowsPerWarp = 2;  // output rows each warp owns
constexpr int kLaneElems = 32;   // NF4 codes per lane per step: one 16-byte load

thread_local char g_last_error[256] = "";

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// 32 consecutive activations of one row, as fp32, with 16-byte loads (8 bf16/fp16 or 4 fp32 each)
template <typename Act>
__device__ __forceinline__ void load_x32(const Act* __restrict__ src, float* dst) {
  constexpr int per_vec = 16 / sizeof(Act);
#pragma unroll
  for (int v = 0; v < kLaneElems / per_vec; ++v) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src) + v);
    const Act* vals = reinterpret_cast<const Act*>(&raw);
#pragma unroll
    for (int e = 0; e < per_vec; ++e) dst[v * per_vec + e] = to_float(vals[e]);
  }
}

struct Scales {
  const float* absmax;
  const uint8_t* absmax_q;
  const float* nested_absmax;
  const float* nested_code;
  const float* nested_offset;
  __device__ __forceinline__ float operator()(int64_t block) const {
    if (absmax) return __ldg(absmax + block);
    // a multiply, then an add (no FMA): bitsandbytes' rounding of the nested statistics
    const float nested = __fmul_rn(__ldg(nested_code + __ldg(absmax_q + block)), __ldg(nested_absmax + (block >> 8)));
    return __fadd_rn(nested, __ldg(nested_offset));
  }
};

template <typename Act, int ROWS>
__global__ void __launch_bounds__(kWarps * 32) nf4_lora_gemv_kernel(
    const Act* __restrict__ x, int T, int64_t K, const uint8_t* __restrict__ packed, int64_t N, int blocksize_log2,
    Scales scales, const Act* __restrict__ bias, const float* __restrict__ lora_b, int R,
    const int32_t* __restrict__ adapter_ids, const float* __restrict__ shrunk, Act* __restrict__ out) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = kNF4[threadIdx.x];
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kRowsPerWarp;
  if (n0 >= N) return;
  float acc[kRowsPerWarp][ROWS];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
    for (int t = 0; t < ROWS; ++t) acc[i][t] = 0.0f;

  for (int64_t k = static_cast<int64_t>(lane) * kLaneElems; k < K; k += 32 * kLaneElems) {
    float w[kRowsPerWarp][kLaneElems];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int64_t n = min(n0 + i, N - 1);  // a missing last row re-reads row N-1 and is not written
      const int64_t flat = n * K + k;
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(packed + (flat >> 1)));
      const float scale = scales(flat >> blocksize_log2);
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&raw);
#pragma unroll
      for (int b = 0; b < 16; ++b) {
        w[i][2 * b] = code[bytes[b] >> 4] * scale;
        w[i][2 * b + 1] = code[bytes[b] & 0xF] * scale;
      }
    }
#pragma unroll
    for (int t = 0; t < ROWS; ++t) {
      if (t < T) {
        float xv[kLaneElems];
        load_x32(x + t * K + k, xv);
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
          for (int e = 0; e < kLaneElems; ++e) acc[i][t] = fmaf(w[i][e], xv[e], acc[i][t]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
    for (int t = 0; t < ROWS; ++t)
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) acc[i][t] += __shfl_xor_sync(0xffffffffu, acc[i][t], offset);

  // lane t writes input row t of each output row
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t n = n0 + i;
#pragma unroll
    for (int t = 0; t < ROWS; ++t) {
      if (lane == t && t < T && n < N) {
        float y = acc[i][t] + (bias ? to_float(bias[n]) : 0.0f);
        const int a = adapter_ids ? adapter_ids[t] : -1;
        if (shrunk && a >= 0) {
          const float* b_row = lora_b + (static_cast<int64_t>(a) * N + n) * R;
          for (int j = 0; j < R; ++j) y = fmaf(shrunk[t * R + j], b_row[j], y);
        }
        out[t * N + n] = from_float<Act>(y);
      }
    }
  }
}

// S[t, j] = scaling[a] * x[t] . A[a, j], one warp per (t, j); zero for base-only rows
template <typename Act>
__global__ void lora_shrink_kernel(const Act* __restrict__ x, int T, int64_t K, const float* __restrict__ lora_a,
                                   const float* __restrict__ scaling, int R, const int32_t* __restrict__ adapter_ids,
                                   float* __restrict__ shrunk) {
  const int item = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (item >= T * R) return;
  const int t = item / R, j = item % R;
  const int a = adapter_ids[t];
  float sum = 0.0f;
  if (a >= 0) {
    const float* a_row = lora_a + (static_cast<int64_t>(a) * R + j) * K;
    for (int64_t k = lane; k < K; k += 32) sum = fmaf(to_float(x[t * K + k]), a_row[k], sum);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) shrunk[item] = a >= 0 ? sum * scaling[a] : 0.0f;
}

template <typename Act, int ROWS>
void launch_gemv(const Act* x, int T, int64_t K, const uint8_t* packed, int64_t N, int blocksize_log2,
                 Scales scales, const Act* bias, const float* lora_b, int R, const int32_t* ids,
                 const float* shrunk, Act* out, cudaStream_t stream) {
  const int64_t rows_per_block = kWarps * kRowsPerWarp;
  const unsigned blocks = static_cast<unsigned>((N + rows_per_block - 1) / rows_per_block);
  nf4_lora_gemv_kernel<Act, ROWS><<<blocks, kWarps * 32, 0, stream>>>(
      x, T, K, packed, N, blocksize_log2, scales, bias, lora_b, R, ids, shrunk, out);
}

template <typename Act>
int run(const void* x_, int T, int64_t K, const uint8_t* packed, int64_t N, int blocksize_log2, Scales scales,
        const void* bias_, const float* lora_a, const float* lora_b, const float* scaling, int64_t n_adapters,
        int R, const int32_t* ids, float* shrunk, void* out_, cudaStream_t stream) {
  const Act* x = static_cast<const Act*>(x_);
  const Act* bias = static_cast<const Act*>(bias_);
  Act* out = static_cast<Act*>(out_);
  const bool has_lora = n_adapters > 0 && R > 0 && lora_a && lora_b && ids;
  if (has_lora) {
    const int warps_per_block = 8;
    const unsigned blocks = static_cast<unsigned>((T * R + warps_per_block - 1) / warps_per_block);
    lora_shrink_kernel<Act><<<blocks, warps_per_block * 32, 0, stream>>>(x, T, K, lora_a, scaling, R, ids, shrunk);
  }
  const float* s = has_lora ? shrunk : nullptr;
  if (T <= 1) launch_gemv<Act, 1>(x, T, K, packed, N, blocksize_log2, scales, bias, lora_b, R, ids, s, out, stream);
  else if (T <= 2) launch_gemv<Act, 2>(x, T, K, packed, N, blocksize_log2, scales, bias, lora_b, R, ids, s, out, stream);
  else if (T <= 4) launch_gemv<Act, 4>(x, T, K, packed, N, blocksize_log2, scales, bias, lora_b, R, ids, s, out, stream);
  else if (T <= 8) launch_gemv<Act, 8>(x, T, K, packed, N, blocksize_log2, scales, bias, lora_b, R, ids, s, out, stream);
  else launch_gemv<Act, 16>(x, T, K, packed, N, blocksize_log2, scales, bias, lora_b, R, ids, s, out, stream);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    snprintf(g_last_error, sizeof(g_last_error), "%s", cudaGetErrorString(err));
    return ABS_FAST_ECUDA;
  }
  return ABS_FAST_OK;
}

}  // namespace

extern "C" {

int abs_fast_cuda_abi_version(void) { return ABS_FAST_NATIVE_ABI; }

const char* abs_fast_cuda_last_error(void) { return g_last_error; }

int abs_fast_nf4_lora_cuda(const void* x, int act_dtype, int64_t rows, int64_t in_features, const uint8_t* packed,
                           int64_t out_features, int64_t blocksize, const float* absmax, const uint8_t* absmax_q,
                           const float* nested_absmax, const float* nested_code, const float* nested_offset,
                           const void* bias, const float* lora_a, const float* lora_b, const float* scaling,
                           int64_t n_adapters, int64_t rank, const int32_t* adapter_ids, float* shrunk_workspace,
                           void* out, void* stream) {
  if (rows < 0 || rows > ABS_FAST_MAX_ROWS || in_features < 1 || out_features < 1 || !packed || !out) {
    return ABS_FAST_EINVAL;
  }
  if (rows == 0) return ABS_FAST_OK;
  if (!x || blocksize < 2 || (blocksize & (blocksize - 1)) || n_adapters < 0 || rank < 0 || rank > 1024) {
    return ABS_FAST_EINVAL;
  }
  if (!absmax && !(absmax_q && nested_absmax && nested_code && nested_offset)) return ABS_FAST_EINVAL;
  if (n_adapters > 0 && rank > 0 && (!lora_a || !lora_b || !scaling || !adapter_ids || !shrunk_workspace)) {
    return ABS_FAST_EINVAL;
  }
  if (in_features % kLaneElems != 0 || blocksize < kLaneElems) return ABS_FAST_EALIGN;
  const Scales scales{absmax, absmax_q, nested_absmax, nested_code, nested_offset};
  const int log2 = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  const int T = static_cast<int>(rows), R = static_cast<int>(rank);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (act_dtype) {
    case 0:
      return run<float>(x, T, in_features, packed, out_features, log2, scales, bias, lora_a, lora_b, scaling,
                        n_adapters, R, adapter_ids, shrunk_workspace, out, s);
    case 1:
      return run<__nv_bfloat16>(x, T, in_features, packed, out_features, log2, scales, bias, lora_a, lora_b, scaling,
                                n_adapters, R, adapter_ids, shrunk_workspace, out, s);
    case 2:
      return run<__half>(x, T, in_features, packed, out_features, log2, scales, bias, lora_a, lora_b, scaling,
                         n_adapters, R, adapter_ids, shrunk_workspace, out, s);
    default:
      return ABS_FAST_EINVAL;
  }
}

}  // extern "C"
