// CPU NF4 matrix-vector / small-batch product with the multi-adapter LoRA epilogue.
//
// Each output row n of W is decoded once and multiplied into every input row (T <= 16): the weight
// bytes, the dominant memory traffic, are read once per call. Three instruction-set variants are
// compiled into one library with GCC/Clang target attributes and chosen at run time:
//   AVX-512F  16 NF4 codes per vpermps from a table held in one register
//   AVX2+FMA  8 codes per step, two 8-entry table halves blended on bit 3 of the code
//   scalar    any shape and alignment (also the fallback when K % 32 != 0 or blocksize < 32)
// Output rows are split across OpenMP threads, in one parallel region per call and only above a
// minimum amount of work per thread (below it the call never wakes another thread). The dequantised weight value is code * scale in fp32,
// bit-identical to bitsandbytes' dequantisation (built with -ffp-contract=off for the scale).
#include "abs_fast_native.h"

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ABS_FAST_X86 1
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

alignas(64) const float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f,
};

struct Problem {
  const float* x;
  int64_t T, K, N, blocksize;
  int blocksize_log2;
  const uint8_t* packed;
  const float* absmax;
  const uint8_t* absmax_q;
  const float* nested_absmax;
  const float* nested_code;
  const float* nested_offset;
  const float* bias;
  const float* lora_b;
  int64_t R;
  const int32_t* adapter_ids;
  const float* shrunk;   // [T, R], scaling applied; null when there is no LoRA term
  const float* x_split;  // x with each 32-chunk split into even then odd elements (vector kernels)
  float* out;
};

inline float block_scale(const Problem& p, int64_t block) {
  if (p.absmax) return p.absmax[block];
  const float nested = p.nested_code[p.absmax_q[block]] * p.nested_absmax[block >> 8];
  return nested + *p.nested_offset;
}

// ---------------------------------------------------------------------------------------------
// scalar: any K, any blocksize, odd element offsets
// ---------------------------------------------------------------------------------------------
struct Scalar {
  static void rows(const Problem& p, int64_t n, float* result) {
    float acc[ABS_FAST_MAX_ROWS] = {0.0f};
    const int64_t K = p.K, flat0 = n * K;
    int64_t k = 0;
    while (k < K) {
      const int64_t block = (flat0 + k) >> p.blocksize_log2;
      const int64_t seg_end = std::min(K, ((block + 1) << p.blocksize_log2) - flat0);
      const float scale = block_scale(p, block);
      for (; k < seg_end; ++k) {
        const int64_t f = flat0 + k;
        const uint8_t byte = p.packed[f >> 1];
        const float w = kNF4[(f & 1) ? (byte & 0xF) : (byte >> 4)] * scale;
        for (int64_t t = 0; t < p.T; ++t) acc[t] += w * p.x[t * K + k];
      }
    }
    for (int64_t t = 0; t < p.T; ++t) result[t] = acc[t];
  }
  static float dot(const float* a, const float* b, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
  }
};

#ifdef ABS_FAST_X86
// The vector kernels read x through `x_split`: within every chunk of 32 elements, the 16 even
// elements first, then the 16 odd ones (built once per call, T * K floats). A byte's high nibble
// (element 2i) then meets x_split[i] and its low nibble (element 2i+1) x_split[16 + i], so the codes
// need no interleaving: one zero-extension and two table lookups per 32 codes.

struct Avx512 {
  template <int ROWS>
  __attribute__((target("avx512f"))) static void rows(const Problem& p, int64_t n, float* result) {
    const __m512 table = _mm512_load_ps(kNF4);
    const __m512i low4 = _mm512_set1_epi32(0xF);
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
    const int64_t K = p.K, flat0 = n * K;
    const uint8_t* wrow = p.packed + (flat0 >> 1);
    for (int64_t k = 0; k < K;) {
      // one scale per block: the chunks of 32 codes inside it share it
      const int64_t block = (flat0 + k) >> p.blocksize_log2;
      const int64_t block_end = std::min(K, ((block + 1) << p.blocksize_log2) - flat0);
      const __m512 scale = _mm512_set1_ps(block_scale(p, block));
      for (; k < block_end; k += 32) {
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow + (k >> 1))));
        const __m512 w_even = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table), scale);
        const __m512 w_odd = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(bytes, low4), table), scale);
        const float* xk = p.x_split + k;
#pragma GCC unroll 16
        for (int r = 0; r < ROWS; ++r) {
          acc[r] = _mm512_fmadd_ps(w_even, _mm512_loadu_ps(xk + r * K), acc[r]);
          acc[r] = _mm512_fmadd_ps(w_odd, _mm512_loadu_ps(xk + r * K + 16), acc[r]);
        }
      }
    }
    for (int r = 0; r < ROWS; ++r) result[r] = _mm512_reduce_add_ps(acc[r]);
  }
  __attribute__((target("avx512f"))) static float dot(const float* a, const float* b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    if (i < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
  }
};

struct Avx2 {
  // 8 codes (in 32-bit lanes) to their values: two 8-entry table halves, chosen by bit 3 of the code
  __attribute__((target("avx2,fma"))) static inline __m256 lookup(__m256i idx, __m256 lo, __m256 hi) {
    const __m256 from_lo = _mm256_permutevar8x32_ps(lo, idx);  // uses idx & 7
    const __m256 from_hi = _mm256_permutevar8x32_ps(hi, idx);
    return _mm256_blendv_ps(from_lo, from_hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  }
  __attribute__((target("avx2,fma"))) static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  template <int ROWS>
  __attribute__((target("avx2,fma"))) static void rows(const Problem& p, int64_t n, float* result) {
    const __m256 tlo = _mm256_load_ps(kNF4), thi = _mm256_load_ps(kNF4 + 8);
    const __m256i low4 = _mm256_set1_epi32(0xF);
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
    const int64_t K = p.K, flat0 = n * K;
    const uint8_t* wrow = p.packed + (flat0 >> 1);
    for (int64_t k = 0; k < K;) {
      const int64_t block = (flat0 + k) >> p.blocksize_log2;
      const int64_t block_end = std::min(K, ((block + 1) << p.blocksize_log2) - flat0);
      const __m256 scale = _mm256_set1_ps(block_scale(p, block));
      for (; k < block_end; k += 32) {
#pragma GCC unroll 2
        for (int half = 0; half < 2; ++half) {  // bytes 8*half .. 8*half+7
          const __m256i bytes = _mm256_cvtepu8_epi32(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wrow + (k >> 1) + 8 * half)));
          const __m256 w_even = _mm256_mul_ps(lookup(_mm256_srli_epi32(bytes, 4), tlo, thi), scale);
          const __m256 w_odd = _mm256_mul_ps(lookup(_mm256_and_si256(bytes, low4), tlo, thi), scale);
          const float* xk = p.x_split + k + 8 * half;
#pragma GCC unroll 16
          for (int r = 0; r < ROWS; ++r) {
            acc[r] = _mm256_fmadd_ps(w_even, _mm256_loadu_ps(xk + r * K), acc[r]);
            acc[r] = _mm256_fmadd_ps(w_odd, _mm256_loadu_ps(xk + r * K + 16), acc[r]);
          }
        }
      }
    }
    for (int r = 0; r < ROWS; ++r) result[r] = hsum(acc[r]);
  }
  __attribute__((target("avx2,fma"))) static float dot(const float* a, const float* b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
  }
};
#endif  // ABS_FAST_X86

using RowsFn = void (*)(const Problem&, int64_t, float*);

template <class Isa, int... Rows>
constexpr RowsFn pick_rows(int64_t rows, std::integer_sequence<int, Rows...>) {
  RowsFn table[] = {&Isa::template rows<Rows + 1>...};
  return table[rows - 1];
}

// Work below which a call runs on the calling thread alone, in weight elements x (rows + 2) (decoding a
// weight costs about two rows' multiply-adds): waking a second thread, or waiting at the join for one
// the OS has descheduled because another process holds its core, costs more than the work. 2^22 is
// about 0.5 ms of AVX2 work on one core; a 576 x 576 projection at 4 rows (2.0M) stays on one thread.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 22;

std::atomic<long long> g_parallel_regions{0};

int threads_for(int64_t rows, int64_t in_features, int64_t out_features, int num_threads) {
  if (num_threads < 2 || rows < 1) return 1;
  const int64_t work = out_features * in_features * (rows + 2);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, work / kMinWorkPerThread)));
}

// The whole call: split x for the vector kernels, shrink through the LoRA A, then the product. Called
// inside one parallel region (the `omp for` loops share its threads and wait at their ends) or, below
// the work threshold, on the calling thread alone (each `omp for` then runs whole, serially).
template <class Isa>
void compute(const Problem& p, RowsFn rows_fn, float* x_split, const float* lora_a, const float* scaling,
             float* shrunk) {
  const int64_t N = p.N, T = p.T, K = p.K, R = p.R;
  if (x_split) {
#pragma omp for schedule(static)
    for (int64_t c = 0; c < T * K / 32; ++c) {
      const int64_t i = c * 32;
      for (int e = 0; e < 16; ++e) {
        x_split[i + e] = p.x[i + 2 * e];
        x_split[i + 16 + e] = p.x[i + 2 * e + 1];
      }
    }
  }
  if (shrunk) {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < T * R; ++i) {
      const int64_t t = i / R, j = i % R;
      const int32_t a = p.adapter_ids[t];
      shrunk[i] = a < 0 ? 0.0f : scaling[a] * Isa::dot(p.x + t * K, lora_a + (a * R + j) * K, K);
    }
  }
#pragma omp for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    float result[ABS_FAST_MAX_ROWS];
    rows_fn(p, n, result);
    const float b = p.bias ? p.bias[n] : 0.0f;
    for (int64_t t = 0; t < T; ++t) {
      float y = result[t] + b;
      const int32_t a = p.adapter_ids ? p.adapter_ids[t] : -1;
      if (p.shrunk && a >= 0) y += Isa::dot(p.shrunk + t * R, p.lora_b + (a * N + n) * R, R);
      p.out[t * N + n] = y;
    }
  }
}

bool cpu_has(int isa) {
#ifdef ABS_FAST_X86
  __builtin_cpu_init();
  if (isa == ABS_FAST_ISA_AVX512) return __builtin_cpu_supports("avx512f");
  if (isa == ABS_FAST_ISA_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == ABS_FAST_ISA_SCALAR;
}

template <class Isa>
int dispatch(Problem& p, const float* lora_a, const float* scaling, int64_t n_adapters, int num_threads) {
  // the vector kernels read 32-element chunks that start a row and never straddle a block
  const bool vector = !std::is_same<Isa, Scalar>::value && p.K % 32 == 0;
  RowsFn rows_fn = &Scalar::rows;
  if constexpr (!std::is_same<Isa, Scalar>::value) {
    if (vector && p.blocksize >= 32) rows_fn = pick_rows<Isa>(p.T, std::make_integer_sequence<int, ABS_FAST_MAX_ROWS>{});
  }
  std::vector<float> x_split(vector ? static_cast<size_t>(p.T * p.K) : 0);
  p.x_split = vector ? x_split.data() : nullptr;
  const bool lora = lora_a && n_adapters > 0 && p.R > 0 && p.adapter_ids;
  std::vector<float> shrunk(lora ? static_cast<size_t>(p.T * p.R) : 0);
  p.shrunk = lora ? shrunk.data() : nullptr;
  float* x_split_out = vector ? x_split.data() : nullptr;
  float* shrunk_out = lora ? shrunk.data() : nullptr;
  const int threads = threads_for(p.T, p.K, p.N, num_threads);
  if (threads > 1) {
    g_parallel_regions.fetch_add(1, std::memory_order_relaxed);
#pragma omp parallel num_threads(threads)
    compute<Isa>(p, rows_fn, x_split_out, lora_a, scaling, shrunk_out);
  } else {
    compute<Isa>(p, rows_fn, x_split_out, lora_a, scaling, shrunk_out);
  }
  return ABS_FAST_OK;
}

}  // namespace

extern "C" {

int abs_fast_abi_version(void) { return ABS_FAST_NATIVE_ABI; }

int abs_fast_cpu_isa_supported(int isa) { return cpu_has(isa) ? 1 : 0; }

int abs_fast_cpu_best_isa(void) {
  if (cpu_has(ABS_FAST_ISA_AVX512)) return ABS_FAST_ISA_AVX512;
  if (cpu_has(ABS_FAST_ISA_AVX2)) return ABS_FAST_ISA_AVX2;
  return ABS_FAST_ISA_SCALAR;
}

int abs_fast_cpu_max_threads(void) {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int abs_fast_cpu_threads_for(int64_t rows, int64_t in_features, int64_t out_features, int num_threads) {
#ifdef _OPENMP
  return threads_for(rows, in_features, out_features, num_threads);
#else
  (void)rows, (void)in_features, (void)out_features, (void)num_threads;
  return 1;
#endif
}

long long abs_fast_cpu_parallel_regions(void) {
#ifdef _OPENMP
  return g_parallel_regions.load(std::memory_order_relaxed);
#else
  return 0;
#endif
}

int abs_fast_nf4_lora_cpu(const float* x, int64_t rows, int64_t in_features, const uint8_t* packed,
                          int64_t out_features, int64_t blocksize, const float* absmax, const uint8_t* absmax_q,
                          const float* nested_absmax, const float* nested_code, const float* nested_offset,
                          const float* bias, const float* lora_a, const float* lora_b, const float* scaling,
                          int64_t n_adapters, int64_t rank, const int32_t* adapter_ids, float* out, int isa,
                          int num_threads) {
  if (rows < 0 || rows > ABS_FAST_MAX_ROWS || in_features < 1 || out_features < 1 || !packed || !out) {
    return ABS_FAST_EINVAL;
  }
  if (rows == 0) return ABS_FAST_OK;
  if (!x || blocksize < 2 || (blocksize & (blocksize - 1)) || n_adapters < 0 || rank < 0) return ABS_FAST_EINVAL;
  if (!absmax && !(absmax_q && nested_absmax && nested_code && nested_offset)) return ABS_FAST_EINVAL;
  if (n_adapters > 0 && rank > 0 && (!lora_a || !lora_b || !scaling || !adapter_ids)) return ABS_FAST_EINVAL;
  if (isa == ABS_FAST_ISA_AUTO) isa = abs_fast_cpu_best_isa();
  if (!cpu_has(isa)) return ABS_FAST_EISA;
  if (num_threads < 1) num_threads = 1;
  Problem p{};
  p.x = x;
  p.T = rows;
  p.K = in_features;
  p.N = out_features;
  p.blocksize = blocksize;
  p.blocksize_log2 = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  p.packed = packed;
  p.absmax = absmax;
  p.absmax_q = absmax_q;
  p.nested_absmax = nested_absmax;
  p.nested_code = nested_code;
  p.nested_offset = nested_offset;
  p.bias = bias;
  p.lora_b = lora_b;
  p.R = rank;
  p.adapter_ids = adapter_ids;
  p.out = out;
#ifdef ABS_FAST_X86
  if (isa == ABS_FAST_ISA_AVX512) return dispatch<Avx512>(p, lora_a, scaling, n_adapters, num_threads);
  if (isa == ABS_FAST_ISA_AVX2) return dispatch<Avx2>(p, lora_a, scaling, n_adapters, num_threads);
#endif
  return dispatch<Scalar>(p, lora_a, scaling, n_adapters, num_threads);
}

}  // extern "C"
