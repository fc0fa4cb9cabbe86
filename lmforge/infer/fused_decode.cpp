// One decode step of a pre-norm decoder (GPT-2 style: LayerNorm, learned positions, GELU or ReLU MLP; Llama
// style: RMSNorm, rotary positions, SwiGLU; multi-head or grouped-query attention) as a single call: every layer, the final norm and the output head, for one new token
// per batch row (or a few: speculative verification), reading and writing lmforge's contiguous KV cache.
// See lmforge/infer/fused.py for why.
//
// The imported families' pieces are here too, each one switch: q/k biases (a linear's bias), RMSNorm on q and k
// (per head or over the projection), heads wider or narrower than n_embd / n_head, norms on the sublayers'
// outputs as well as (or instead of) their inputs, GeGLU, embeddings scaled by sqrt(d), a score scale and
// soft-cap, per-layer sliding windows, partial and scaled rotary tables (local layers' own, LongRoPE's long ones),
// and soft-capped logits.
//
// Linear layers are AVX2/FMA matrix-vector products over the row-major float32 weights nn.Linear already holds,
// a few output rows x a few batch rows per register tile, split across PyTorch's threads (at::parallel_for) by
// output rows; bias, activation and the residual add are applied while the outputs are still in cache. bfloat16
// models hand over their weights packed for oneDNN instead, whose bfloat16 tiles (AMX, AVX-512 BF16) do many rows
// at a time far faster than float32 FMAs can; everything between the matrix products stays float32.
//
// The KV cache holds float32, bfloat16 (widened by a shift) or float16 (F16C converts 8 values per instruction as they stream in; new keys and
// values are rounded to nearest even, as torch's .to(torch.float16) rounds them): attention at many rows and long
// contexts is mostly reading the cache, so half the bytes is most of half the time.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace {

constexpr int kNone = 0, kGeluErf = 1, kGeluTanh = 2, kRelu = 3, kSwiGLU = 4, kGeGLUTanh = 5;

// An absent bias or scale comes from Python as an empty tensor.
inline bool present(const at::Tensor& t) { return t.defined() && t.numel() > 0; }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for 8 floats: Cephes' expf (range reduction by ln 2 in two parts, degree-5 polynomial), ~1 ulp.
inline __m256 vexp(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// erf(x): Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), odd symmetry.
inline __m256 verf(__m256 x) {
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a,
                                                                      _mm256_set1_ps(1.0f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(p, t);
  const __m256 e = vexp(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
  return _mm256_or_ps(_mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.0f)), sign);
}

inline __m256 vtanh(__m256 u) {  // 1 - 2 / (exp(2u) + 1)
  const __m256 e = vexp(_mm256_add_ps(u, u));
  return _mm256_sub_ps(_mm256_set1_ps(1.0f),
                       _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
}

inline float activate1(float v, int act) {
  switch (act) {
    case kGeluErf: return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    case kGeluTanh: return 0.5f * v * (1.0f + std::tanh(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case kRelu: return v > 0.0f ? v : 0.0f;
    default: return v;
  }
}

void activate(float* y, int64_t n, int act) {
  if (act == kNone) return;
  int64_t i = 0;
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(y + i), out;
    if (act == kGeluErf) {
      out = _mm256_mul_ps(_mm256_mul_ps(half, v),
                          _mm256_add_ps(one, verf(_mm256_mul_ps(v, _mm256_set1_ps(0.70710678118654752f)))));
    } else if (act == kGeluTanh) {
      __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v), _mm256_mul_ps(v, v), v);
      out = _mm256_mul_ps(_mm256_mul_ps(half, v),
                          _mm256_add_ps(one, vtanh(_mm256_mul_ps(_mm256_set1_ps(0.79788456080286536f), inner))));
    } else {
      out = _mm256_max_ps(v, _mm256_setzero_ps());
    }
    _mm256_storeu_ps(y + i, out);
  }
  for (; i < n; ++i) y[i] = activate1(y[i], act);
}

// Eight values as floats: float32 as they are; int8 weights widened (the per-row scale is applied to the finished
// dot); float16 (F16C) and bfloat16 keys and values widened exactly. `widen` is the same for one value.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const at::BFloat16* p) {  // bfloat16 is float32's top half: widen by a 16-bit shift, exact
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline float widen(float x) { return x; }
inline float widen(at::Half x) { return static_cast<float>(x); }
inline float widen(at::BFloat16 x) { return static_cast<float>(x); }

#if defined(__AVX512VL__)
// R batch rows against 4 output rows (4R accumulators; every weight vector used R times from a register), each
// dot product summed in the one fixed order. finish(b, o, acc) completes one.
// With AVX-512's 32 vector registers (VL: 256-bit instructions on all of them) up to 6 rows: 24 accumulators,
// 6 rows of x and one weight vector, 24 FMAs per 10 loads (3 rows: 12 per 7). Tile shape never changes a sum.
constexpr int64_t kTileRows = 6;
template <int R, typename W, typename Finish>
inline void tile(const float* x, int64_t b, int64_t K, int64_t Kv, const W* w, int64_t o, const W* pf,
                 const Finish& finish) {
  const W* wr = w + o * K;
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < Kv; k += 8) {
    if (pf && (k * sizeof(W)) % 64 == 0)
      for (int i = 0; i < 4; ++i) _mm_prefetch(reinterpret_cast<const char*>(pf + i * K + k), _MM_HINT_T0);
    __m256 xv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_ps(x + (b + r) * K + k);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m256 v = load8(wr + i * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][i] = _mm256_fmadd_ps(v, xv[r], acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) finish(b + r, o + i, acc[r][i]);
}

// float32 weights in 512-bit steps: the same tile with 16-lane accumulators, the order `dot16` defines.
// finish16(b, o, sum) completes one from its 16 lanes' sum.
template <int R, typename Finish>
inline void tile16(const float* x, int64_t b, int64_t K, int64_t Kv, const float* w, int64_t o, const float* pf,
                   const Finish& finish16) {
  const float* wr = w + o * K;
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kv; k += 16) {
    if (pf)
      for (int i = 0; i < 4; ++i) _mm_prefetch(reinterpret_cast<const char*>(pf + i * K + k), _MM_HINT_T0);
    __m512 xv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) xv[r] = _mm512_loadu_ps(x + (b + r) * K + k);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m512 v = _mm512_loadu_ps(wr + i * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][i] = _mm512_fmadd_ps(v, xv[r], acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) finish16(b + r, o + i, _mm512_reduce_add_ps(acc[r][i]));
}
#endif

// y[b, o] (+)= (x[b, :] . w[o, :]) * scale[o] + bias[o] for o in [o0, o1) (scale: int8 weights only).
//
// Every dot product is summed in the same order whatever the tile (one 8-lane accumulator over k, then the lanes,
// then the tail), so a row's result does not depend on which other rows share the batch: batched decoding,
// speculative verification and single-row decoding give bit-identical logits. Tiles: one row against one output
// (float32) or 8 (int8; prefetching the weight rows 32 ahead into L2: into L1 they were evicted before use;
// gpt-14m's 25 1-row products 1.96 -> 1.51 ms on an AMD EPYC Zen 4), or up to 3 rows (AVX2) / 6 rows (AVX-512)
// against 4 outputs (weights reused from registers).
template <typename W>
void linear_rows(const float* x, int64_t B, int64_t K, const W* w, const float* scale, const float* bias, float* y,
                 int64_t ldy, int64_t o0, int64_t o1, bool accumulate) {
  const int64_t K8 = K - K % 8;
  auto finish = [&](int64_t b, int64_t o, __m256 acc) {
    float v = hsum(acc);
    for (int64_t k = K8; k < K; ++k) v += x[b * K + k] * static_cast<float>(w[o * K + k]);
    if (scale) v *= scale[o];
    if (bias) v += bias[o];
    float& out = y[b * ldy + o];
    out = accumulate ? out + v : v;
  };
  int64_t o = o0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<W, float>) {
    // float32 with AVX-512: every product in 16-lane steps, one fixed order (a 16-lane accumulator over k, its
    // lanes reduced, then the tail), twice the arithmetic per instruction of 8 lanes: the engine's 32-row
    // products are compute-bound, and on CPUs with full-width AVX-512 (AMD Zen 5, Intel) they ran at half the
    // FMA rate in 8 lanes. One row keeps one weight row at a time with the row 16 ahead fetched into L2.
    const int64_t K16 = K - K % 16;
    auto finish16 = [&](int64_t b, int64_t o, float v) {
      for (int64_t k = K16; k < K; ++k) v += x[b * K + k] * w[o * K + k];
      if (bias) v += bias[o];
      float& out = y[b * ldy + o];
      out = accumulate ? out + v : v;
    };
    if (B == 1) {
      for (; o < o1; ++o) {
        const float* r = w + o * K;
        const bool prefetch = o + 16 < o1;
        __m512 a = _mm512_setzero_ps();
        for (int64_t k = 0; k < K16; k += 16) {
          if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(r + 16 * K + k), _MM_HINT_T1);
          a = _mm512_fmadd_ps(_mm512_loadu_ps(r + k), _mm512_loadu_ps(x + k), a);
        }
        finish16(0, o, _mm512_reduce_add_ps(a));
      }
      return;
    }
    for (; o + 4 <= o1; o += 4) {
      const float* next = o + 12 <= o1 ? w + (o + 8) * K : nullptr;
      for (int64_t b = 0, tiles = (B + kTileRows - 1) / kTileRows; b < B; --tiles) {
        const int rows = static_cast<int>((B - b + tiles - 1) / tiles);
        const float* pf = b == 0 ? next : nullptr;
        switch (rows) {
          case 1: tile16<1>(x, b, K, K16, w, o, pf, finish16); break;
          case 2: tile16<2>(x, b, K, K16, w, o, pf, finish16); break;
          case 3: tile16<3>(x, b, K, K16, w, o, pf, finish16); break;
          case 4: tile16<4>(x, b, K, K16, w, o, pf, finish16); break;
          case 5: tile16<5>(x, b, K, K16, w, o, pf, finish16); break;
          default: tile16<6>(x, b, K, K16, w, o, pf, finish16); break;
        }
        b += rows;
      }
    }
    for (; o < o1; ++o)
      for (int64_t b = 0; b < B; ++b) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t k = 0; k < K16; k += 16)
          a = _mm512_fmadd_ps(_mm512_loadu_ps(w + o * K + k), _mm512_loadu_ps(x + b * K + k), a);
        finish16(b, o, _mm512_reduce_add_ps(a));
      }
    return;
  }
#endif
  if (B == 1 && std::is_same_v<W, float>) {
    // float32, one row: one weight row at a time, the row 16 ahead fetched into L2 as this one streams: a single
    // stream per thread keeps up with memory better than 8 rows side by side (AMD EPYC Zen 5, 1 thread, the 49
    // products of a 12 x 768 Llama: 30.9 vs 27.2 GB/s). One accumulator chain (FMA latency) caps it near 8 bytes
    // a cycle, above what one core draws from memory; int8 weights, a quarter of the bytes per FMA, would be
    // capped at a quarter of that, so they keep the 8-row tiles below.
    for (; o < o1; ++o) {
      const W* r = w + o * K;
      const bool prefetch = o + 16 < o1;
      __m256 a = _mm256_setzero_ps();
      for (int64_t k = 0; k < K8; k += 8) {
        if (prefetch && k % 16 == 0) _mm_prefetch(reinterpret_cast<const char*>(r + 16 * K + k), _MM_HINT_T1);
        a = _mm256_fmadd_ps(load8(r + k), _mm256_loadu_ps(x + k), a);
      }
      finish(0, o, a);
    }
  }
  if (B == 1) {
    for (; o + 8 <= o1; o += 8) {
      const W* r = w + o * K;
      const bool prefetch = o + 40 <= o1;
      __m256 a[8];
      for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
      for (int64_t k = 0; k < K8; k += 8) {
        if (prefetch && (k * sizeof(W)) % 64 == 0)
          for (int i = 0; i < 8; ++i) _mm_prefetch(reinterpret_cast<const char*>(r + (32 + i) * K + k), _MM_HINT_T1);
        const __m256 xv = _mm256_loadu_ps(x + k);
        for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(load8(r + i * K + k), xv, a[i]);
      }
      for (int i = 0; i < 8; ++i) finish(0, o + i, a[i]);
    }
  }
  // The first row tile fetches the next 4 weight rows into cache while the later tiles reuse these ones: without
  // it each group of rows starts with a run of cache misses (at 8 rows the matrix products ran 1.6x slower
  // streaming from memory than hot in cache).
#if defined(__AVX512VL__)
  for (; o + 4 <= o1; o += 4) {
    const W* next = o + 12 <= o1 ? w + (o + 8) * K : nullptr;
    for (int64_t b = 0, tiles = (B + kTileRows - 1) / kTileRows; b < B; --tiles) {
      const int rows = static_cast<int>((B - b + tiles - 1) / tiles);  // rows shared evenly: 8 = 4 + 4, not 6 + 2
      const W* pf = b == 0 ? next : nullptr;
      switch (rows) {
        case 1: tile<1>(x, b, K, K8, w, o, pf, finish); break;
        case 2: tile<2>(x, b, K, K8, w, o, pf, finish); break;
        case 3: tile<3>(x, b, K, K8, w, o, pf, finish); break;
        case 4: tile<4>(x, b, K, K8, w, o, pf, finish); break;
        case 5: tile<5>(x, b, K, K8, w, o, pf, finish); break;
        default: tile<6>(x, b, K, K8, w, o, pf, finish); break;
      }
      b += rows;
    }
  }
#else  // AVX2: 16 registers, tiles of 3 / 2 / 1 rows written out
  for (; o + 4 <= o1; o += 4) {
    const W *w0 = w + o * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    const W* next = o + 12 <= o1 ? w3 + 5 * K : nullptr;
    int64_t b = 0;
    for (; b + 3 <= B; b += 3) {  // 12 accumulators: enough independent FMAs to hide their latency
      const float *xa = x + b * K, *xb = xa + K, *xc = xb + K;
      const W* pf = b == 0 ? next : nullptr;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
      __m256 d0 = a0, d1 = a0, d2 = a0, d3 = a0;
      for (int64_t k = 0; k < K8; k += 8) {
        if (pf && (k * sizeof(W)) % 64 == 0)
          for (int i = 0; i < 4; ++i) _mm_prefetch(reinterpret_cast<const char*>(pf + i * K + k), _MM_HINT_T0);
        const __m256 va = _mm256_loadu_ps(xa + k), vb = _mm256_loadu_ps(xb + k), vc = _mm256_loadu_ps(xc + k);
        __m256 v = load8(w0 + k);
        a0 = _mm256_fmadd_ps(v, va, a0); c0 = _mm256_fmadd_ps(v, vb, c0); d0 = _mm256_fmadd_ps(v, vc, d0);
        v = load8(w1 + k);
        a1 = _mm256_fmadd_ps(v, va, a1); c1 = _mm256_fmadd_ps(v, vb, c1); d1 = _mm256_fmadd_ps(v, vc, d1);
        v = load8(w2 + k);
        a2 = _mm256_fmadd_ps(v, va, a2); c2 = _mm256_fmadd_ps(v, vb, c2); d2 = _mm256_fmadd_ps(v, vc, d2);
        v = load8(w3 + k);
        a3 = _mm256_fmadd_ps(v, va, a3); c3 = _mm256_fmadd_ps(v, vb, c3); d3 = _mm256_fmadd_ps(v, vc, d3);
      }
      finish(b, o, a0); finish(b, o + 1, a1); finish(b, o + 2, a2); finish(b, o + 3, a3);
      finish(b + 1, o, c0); finish(b + 1, o + 1, c1); finish(b + 1, o + 2, c2); finish(b + 1, o + 3, c3);
      finish(b + 2, o, d0); finish(b + 2, o + 1, d1); finish(b + 2, o + 2, d2); finish(b + 2, o + 3, d3);
    }
    for (; b + 2 <= B; b += 2) {
      const float *xa = x + b * K, *xb = xa + K;
      const W* pf = b == 0 ? next : nullptr;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
      for (int64_t k = 0; k < K8; k += 8) {
        if (pf && (k * sizeof(W)) % 64 == 0)
          for (int i = 0; i < 4; ++i) _mm_prefetch(reinterpret_cast<const char*>(pf + i * K + k), _MM_HINT_T0);
        const __m256 va = _mm256_loadu_ps(xa + k), vb = _mm256_loadu_ps(xb + k);
        const __m256 v0 = load8(w0 + k), v1 = load8(w1 + k);
        const __m256 v2 = load8(w2 + k), v3 = load8(w3 + k);
        a0 = _mm256_fmadd_ps(v0, va, a0); c0 = _mm256_fmadd_ps(v0, vb, c0);
        a1 = _mm256_fmadd_ps(v1, va, a1); c1 = _mm256_fmadd_ps(v1, vb, c1);
        a2 = _mm256_fmadd_ps(v2, va, a2); c2 = _mm256_fmadd_ps(v2, vb, c2);
        a3 = _mm256_fmadd_ps(v3, va, a3); c3 = _mm256_fmadd_ps(v3, vb, c3);
      }
      finish(b, o, a0); finish(b, o + 1, a1); finish(b, o + 2, a2); finish(b, o + 3, a3);
      finish(b + 1, o, c0); finish(b + 1, o + 1, c1); finish(b + 1, o + 2, c2); finish(b + 1, o + 3, c3);
    }
    for (; b < B; ++b) {
      const float* xa = x + b * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t k = 0; k < K8; k += 8) {
        const __m256 va = _mm256_loadu_ps(xa + k);
        a0 = _mm256_fmadd_ps(load8(w0 + k), va, a0);
        a1 = _mm256_fmadd_ps(load8(w1 + k), va, a1);
        a2 = _mm256_fmadd_ps(load8(w2 + k), va, a2);
        a3 = _mm256_fmadd_ps(load8(w3 + k), va, a3);
      }
      finish(b, o, a0); finish(b, o + 1, a1); finish(b, o + 2, a2); finish(b, o + 3, a3);
    }
  }
#endif
  for (; o < o1; ++o) {
    for (int64_t b = 0; b < B; ++b) {
      __m256 a0 = _mm256_setzero_ps();
      for (int64_t k = 0; k < K8; k += 8)
        a0 = _mm256_fmadd_ps(load8(w + o * K + k), _mm256_loadu_ps(x + b * K + k), a0);
      finish(b, o, a0);
    }
  }
}

// The same for a weight packed for oneDNN (lmforge.infer.packed; bfloat16 models): one oneDNN matrix product of
// all B rows, x rounded to the weight's dtype on the way in and the product on the way out (AMX or AVX-512 BF16
// tiles where the CPU has them: at 32 rows 2-5x float32's time, bench/engine.py), then bias, activation and
// residual in float32. oneDNN picks its kernel by the number of rows, so unlike linear_rows a row's result may
// change in the last bfloat16 place with the batch.
void linear_onednn(const float* x, int64_t B, int64_t K, const at::Tensor& w, const at::Tensor& bias, float* y,
                   bool accumulate, int act) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                        c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
  const int64_t N = w.size(0);
  const at::Tensor in = at::from_blob(const_cast<float*>(x), {B, K}, at::kFloat).to(w.scalar_type());
  const at::Tensor out = op.call(in, w, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt).to(at::kFloat).contiguous();
  const float* o = out.data_ptr<float>();
  const float* bp = present(bias) ? bias.data_ptr<float>() : nullptr;
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* yr = y + b * N;
      for (int64_t n = 0; n < N; ++n) {
        const float v = o[b * N + n] + (bp ? bp[n] : 0.0f);
        yr[n] = accumulate ? yr[n] + v : v;
      }
      activate(yr, N, act);
    }
  });
}

// ---- 4-bit weights: lmforge.infer.quantize.Int4Linear, laid out as GGUF's Q4_0 ----
// A row of K weights is K/32 blocks of 16 bytes: byte i of a block holds its value i in the low nibble and its value
// 16 + i in the high one (Q4_0's order), each a q in 0..15 standing for (q - 8) * d, d the block's float16 scale
// (K/32 of them a row). A block is widened to float in registers as it streams in, exactly ((q - 8) * d needs
// 4 + 11 significant bits): on AVX-512 a 16-entry table of (q - 8) * d is made per block (one multiply) and each
// 16 values are looked up in it by their nibble (vpermps reads an index's low 4 bits only, so the low nibbles need
// no mask and the high ones one shift); on AVX2, converted and scaled (fma(q, d, -8d)). Every dot product is summed
// in one fixed order, block by block, part by part (two 16-lane parts on AVX-512, four 8-lane ones on AVX2) into one
// accumulator, then its lanes: whatever the tile, a row's outputs are the bits it gets alone.
#if defined(__AVX512F__)
using Q4Vec = __m512;
constexpr int kQ4Parts = 2, kQ4Rows = 4;
inline Q4Vec q4_zero() { return _mm512_setzero_ps(); }
inline Q4Vec q4_load(const float* x) { return _mm512_loadu_ps(x); }
inline void q4_store(float* y, Q4Vec v) { _mm512_storeu_ps(y, v); }
inline Q4Vec q4_fma(Q4Vec a, Q4Vec b, Q4Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float q4_sum(Q4Vec a) { return _mm512_reduce_add_ps(a); }
inline void q4_block(const uint8_t* block, const at::Half* scale, Q4Vec w[kQ4Parts]) {
  const __m512 d = _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(scale->x)));
  const __m512 table = _mm512_mul_ps(_mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7), d);
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block)));
  w[0] = _mm512_permutexvar_ps(bytes, table);                         // values 0..15: low nibbles
  w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);  // values 16..31: high nibbles
}
#else
using Q4Vec = __m256;
constexpr int kQ4Parts = 4, kQ4Rows = 2;
inline Q4Vec q4_zero() { return _mm256_setzero_ps(); }
inline Q4Vec q4_load(const float* x) { return _mm256_loadu_ps(x); }
inline void q4_store(float* y, Q4Vec v) { _mm256_storeu_ps(y, v); }
inline Q4Vec q4_fma(Q4Vec a, Q4Vec b, Q4Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float q4_sum(Q4Vec a) { return hsum(a); }
inline void q4_block(const uint8_t* block, const at::Half* scale, Q4Vec w[kQ4Parts]) {
  const float s = _cvtsh_ss(scale->x);
  const __m256 d = _mm256_set1_ps(s), m = _mm256_set1_ps(-8.0f * s);
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block)), mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  const __m128i parts[4] = {lo, _mm_unpackhi_epi64(lo, lo), hi, _mm_unpackhi_epi64(hi, hi)};  // values 8p..8p+7
  for (int p = 0; p < 4; ++p) w[p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p])), d, m);
}
#endif
constexpr int kQ4Lanes = 32 / kQ4Parts;

// R batch rows (from b) against O output rows (from o): each block of the O weight rows widened once and used R
// times. pf: O weight rows to prefetch alongside (or null).
template <int R, int O, typename Finish>
inline void q4_tile(const float* x, int64_t b, int64_t K, const uint8_t* q, const at::Half* scale, int64_t o,
                    const uint8_t* pf, const Finish& finish) {
  const int64_t blocks = K / 32, row_bytes = K / 2;
  Q4Vec acc[R][O];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < O; ++i) acc[r][i] = q4_zero();
  for (int64_t j = 0; j < blocks; ++j) {
    if (pf && j % 4 == 0)  // 4 blocks = one 64-byte line of each row
      for (int i = 0; i < O; ++i) _mm_prefetch(reinterpret_cast<const char*>(pf + i * row_bytes + 16 * j), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int i = 0; i < O; ++i) {
      Q4Vec w[kQ4Parts];
      q4_block(q + (o + i) * row_bytes + 16 * j, scale + (o + i) * blocks + j, w);
#pragma GCC unroll 4
      for (int p = 0; p < kQ4Parts; ++p)
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r)
          acc[r][i] = q4_fma(w[p], q4_load(x + (b + r) * K + 32 * j + kQ4Lanes * p), acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < O; ++i) finish(b + r, o + i, q4_sum(acc[r][i]));
}

template <int O, typename Finish>
inline void q4_rows(const float* x, int64_t B, int64_t K, const uint8_t* q, const at::Half* scale, int64_t o,
                    const uint8_t* pf, const Finish& finish) {
  for (int64_t b = 0, tiles = (B + kQ4Rows - 1) / kQ4Rows; b < B; --tiles) {
    const int rows = static_cast<int>((B - b + tiles - 1) / tiles);  // rows shared evenly
    const uint8_t* p = b == 0 ? pf : nullptr;
    switch (rows) {
#if defined(__AVX512F__)
      case 4: q4_tile<4, O>(x, b, K, q, scale, o, p, finish); break;
      case 3: q4_tile<3, O>(x, b, K, q, scale, o, p, finish); break;
#endif
      case 2: q4_tile<2, O>(x, b, K, q, scale, o, p, finish); break;
      default: q4_tile<1, O>(x, b, K, q, scale, o, p, finish); break;
    }
    b += rows;
  }
}

// y[b, o] (+)= x[b, :] . ((q[o, :] - 8) * d[o, block]) + bias[o] for o in [o0, o1).
void linear_rows_q4(const float* x, int64_t B, int64_t K, const uint8_t* q, const at::Half* scale, const float* bias,
                    float* y, int64_t ldy, int64_t o0, int64_t o1, bool accumulate) {
  const int64_t row_bytes = K / 2;
  auto finish = [&](int64_t b, int64_t o, float v) {
    if (bias) v += bias[o];
    float& out = y[b * ldy + o];
    out = accumulate ? out + v : v;
  };
  int64_t o = o0;
  if (B == 1)  // one row: 8 weight rows a tile (1 thread, a 12 x 768 Llama's products: 17.2 vs 15.8 GB/s at 4)
    for (; o + 8 <= o1; o += 8) q4_tile<1, 8>(x, 0, K, q, scale, o, o + 24 <= o1 ? q + (o + 16) * row_bytes : nullptr,
                                              finish);
  for (; o + 4 <= o1; o += 4) {  // the first row tile fetches the rows 8 ahead into cache
    q4_rows<4>(x, B, K, q, scale, o, o + 12 <= o1 ? q + (o + 8) * row_bytes : nullptr, finish);
  }
  for (; o < o1; ++o) q4_rows<1>(x, B, K, q, scale, o, nullptr, finish);
}

// The float weight (N, K) a 4-bit one stands for, each row widened as the kernel widens it (exactly).
at::Tensor dequantize_q4(const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous() && scale.dim() == 2 &&
              scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.size(0) == q.size(0),
              "dequantize_q4 wants contiguous uint8 weights (N, K/2) and float16 scales (N, K/32)");
  const int64_t N = q.size(0), K = 2 * q.size(1);
  TORCH_CHECK(K % 32 == 0 && scale.size(1) == K / 32, "4-bit rows of ", K, " values need ", K / 32,
              " block scales, got ", scale.size(1));
  at::Tensor out = at::empty({N, K}, q.options().dtype(at::kFloat));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t j = 0; j < K / 32; ++j) {
        Q4Vec w[kQ4Parts];
        q4_block(qp + n * (K / 2) + 16 * j, sp + n * (K / 32) + j, w);
        for (int p = 0; p < kQ4Parts; ++p) q4_store(op + n * K + 32 * j + kQ4Lanes * p, w[p]);
      }
  });
  return out;
}

// y (B x N) (+)= act(x (B x K) @ (w * scale[:, None]).T + bias), output rows split across threads; w is float32,
// int8 with per-row float32 scales, 4-bit with float16 block scales (linear_rows_q4), or packed for oneDNN
// (linear_onednn).
void linear(const float* x, int64_t B, int64_t K, const at::Tensor& w, const at::Tensor& scale,
            const at::Tensor& bias, float* y, bool accumulate = false, int act = kNone) {
  if (w.is_mkldnn()) {
    TORCH_CHECK(!present(scale), "oneDNN-packed weights take no scales");
    return linear_onednn(x, B, K, w, bias, y, accumulate, act);
  }
  const int64_t N = w.size(0);
  const bool q8 = w.scalar_type() == at::kChar, q4 = w.scalar_type() == at::kByte;
  TORCH_CHECK((q8 || q4) == present(scale), "int8 and 4-bit weights need scales, float32 weights take none");
  TORCH_CHECK(!q4 || (scale.scalar_type() == at::kHalf && scale.dim() == 2 && scale.size(0) == N &&
                      2 * w.size(1) == K && K % 32 == 0 && scale.size(1) == K / 32),
              "4-bit weights (N, K/2) with K a multiple of 32 take float16 scales (N, K/32)");
  const float* sp = q8 ? scale.data_ptr<float>() : nullptr;
  const float* bp = present(bias) ? bias.data_ptr<float>() : nullptr;
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t begin, int64_t end) {
    const int64_t o0 = begin * 4, o1 = std::min(N, end * 4);
    if (q4)
      linear_rows_q4(x, B, K, w.data_ptr<uint8_t>(), scale.data_ptr<at::Half>(), bp, y, N, o0, o1, accumulate);
    else if (q8)
      linear_rows(x, B, K, w.data_ptr<int8_t>(), sp, bp, y, N, o0, o1, accumulate);
    else
      linear_rows(x, B, K, w.data_ptr<float>(), sp, bp, y, N, o0, o1, accumulate);
    if (act != kNone)
      for (int64_t b = 0; b < B; ++b) activate(y + b * N + o0, o1 - o0, act);
  });
}

// scale * (q . k) over hs floats, summed in the one fixed order every dot product of the step uses: 8-lane steps
// over d, then the lanes, then the tail.
template <typename KV>
inline float dot(const float* q, const KV* k, int64_t hs, float scale) {
  const int64_t hs8 = hs - hs % 8;
  __m256 a = _mm256_setzero_ps();
  for (int64_t d = 0; d < hs8; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), a);
  float t = hsum(a);
  for (int64_t d = hs8; d < hs; ++d) t += q[d] * widen(k[d]);
  return t * scale;
}

// Four `dot`s at once (out[i] = scale * q[i] . k[i]): four independent FMA chains, each in the same order as `dot`.
template <typename KV>
inline void dot4(const float* const q[4], const KV* const k[4], int64_t hs, float scale, float* const out[4]) {
  const int64_t hs8 = hs - hs % 8;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t d = 0; d < hs8; d += 8) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q[0] + d), load8(k[0] + d), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q[1] + d), load8(k[1] + d), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q[2] + d), load8(k[2] + d), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q[3] + d), load8(k[3] + d), a3);
  }
  const __m256 acc[4] = {a0, a1, a2, a3};
  for (int i = 0; i < 4; ++i) {
    float t = hsum(acc[i]);
    for (int64_t d = hs8; d < hs; ++d) t += q[i][d] * widen(k[i][d]);
    *out[i] = t * scale;
  }
}

// Attention of heads h0..h1-1 of one row: out[h] = softmax(scale * q[h] . k_s) weighted sum of v_s over slots
// s in [start, end]. Slot s's keys and values for kv head j are the hs floats at k + slots[s] * stride +
// j * head_stride (v likewise); query head h reads kv head h / group. Scratch: score, (h1 - h0) x cap floats;
// inv, h1 - h0.
//
// Reading the keys and values is most of the work at long contexts and many rows, so each is read once, slot by
// slot, for all of the row's heads together: in the engine's paged pool a slot's heads are one contiguous row and a
// block's slots follow one another (head by head, the same bytes came as scattered 256-byte pieces and the memory
// sat idle half the time). The hardware prefetcher does not follow a row from one block to the next (blocks lie
// anywhere in the pool, and it stops at 4 KB pages), so the slot kPrefetchBytes ahead is prefetched explicitly:
// 32 rows x 96 slots of gpt-14m's float16 pool, 28 MB a step, went from 13-14 GB/s to 23-27 GB/s, the rate one core
// streams a plain array at (AMD EPYC Zen 5, one thread). Every dot product and every weighted sum is still
// accumulated in one fixed order (over d in 8-lane steps, then over slots), whatever the grouping.
constexpr int64_t kPrefetchBytes = 6144;

// Prefetch the kv heads j0..j1-1 of slot s into L1: hs values each, at s * stride + j * head_stride.
template <typename KV>
inline void prefetch_slot(const KV* base, int64_t slot, int64_t stride, int64_t head_stride, int64_t j0, int64_t j1,
                          int64_t hs) {
  for (int64_t j = j0; j < j1; ++j) {
    const char* p = reinterpret_cast<const char*>(base + slot * stride + j * head_stride);
    for (int64_t b = 0; b < hs * static_cast<int64_t>(sizeof(KV)); b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
  }
}

template <typename KV>
void attend(const float* q, const KV* k, const KV* v, const int64_t* slots, int64_t stride,
            int64_t head_stride, int64_t start, int64_t end, int64_t h0, int64_t h1, int64_t group, int64_t hs,
            float scale, float softcap, float* score, int64_t cap, float* inv, float* out) {
  const int64_t hs8 = hs - hs % 8, H = h1 - h0;
  auto key = [&](int64_t s, int64_t h) { return k + slots[s] * stride + (h / group) * head_stride; };
  auto sc = [&](int64_t s, int64_t h) { return score + (h - h0) * cap + s; };
  const int64_t j0 = h0 / group, j1 = (h1 - 1) / group + 1;  // the kv heads this task reads
  const int64_t ahead = std::max<int64_t>(2, kPrefetchBytes / ((j1 - j0) * hs * static_cast<int64_t>(sizeof(KV))));
  if (H >= 4) {  // many heads (whole rows): a slot's keys for four heads at once
    for (int64_t s = start; s <= end; ++s) {
      if (s + ahead <= end) prefetch_slot(k, slots[s + ahead], stride, head_stride, j0, j1, hs);
      int64_t h = h0;
      for (; h + 4 <= h1; h += 4) {
        const float* qs[4] = {q + h * hs, q + (h + 1) * hs, q + (h + 2) * hs, q + (h + 3) * hs};
        const KV* ks[4] = {key(s, h), key(s, h + 1), key(s, h + 2), key(s, h + 3)};
        float* outs[4] = {sc(s, h), sc(s, h + 1), sc(s, h + 2), sc(s, h + 3)};
        dot4(qs, ks, hs, scale, outs);
      }
      for (; h < h1; ++h) *sc(s, h) = dot(q + h * hs, key(s, h), hs, scale);
    }
  } else {  // few heads (one row split across threads): four slots of a head at once
    for (int64_t h = h0; h < h1; ++h) {
      const float* qh = q + h * hs;
      const int64_t j = h / group;
      int64_t s = start;
      for (; s + 4 <= end + 1; s += 4) {
        for (int64_t i = s + ahead; i < std::min(s + ahead + 4, end + 1); ++i)
          prefetch_slot(k, slots[i], stride, head_stride, j, j + 1, hs);
        const float* qs[4] = {qh, qh, qh, qh};
        const KV* ks[4] = {key(s, h), key(s + 1, h), key(s + 2, h), key(s + 3, h)};
        float* outs[4] = {sc(s, h), sc(s + 1, h), sc(s + 2, h), sc(s + 3, h)};
        dot4(qs, ks, hs, scale, outs);
      }
      for (; s <= end; ++s) *sc(s, h) = dot(qh, key(s, h), hs, scale);
    }
  }

  if (softcap > 0.0f)  // Gemma 2: scores squashed into (-softcap, softcap) before the softmax
    for (int64_t i = 0; i < H; ++i)
      for (int64_t s = start; s <= end; ++s) score[i * cap + s] = std::tanh(score[i * cap + s] / softcap) * softcap;

  for (int64_t i = 0; i < H; ++i) {  // softmax of each head's scores, in place
    float* e = score + i * cap;
    float top = -INFINITY;
    for (int64_t s = start; s <= end; ++s) top = std::max(top, e[s]);
    const __m256 vtop = _mm256_set1_ps(top);
    __m256 vtotal = _mm256_setzero_ps();
    int64_t s = start;
    for (; s + 8 <= end + 1; s += 8) {
      const __m256 x = vexp(_mm256_sub_ps(_mm256_loadu_ps(e + s), vtop));
      _mm256_storeu_ps(e + s, x);
      vtotal = _mm256_add_ps(vtotal, x);
    }
    float total = hsum(vtotal);
    for (; s <= end; ++s) total += (e[s] = std::exp(e[s] - top));
    inv[i] = 1.0f / total;
  }

  std::fill(out + h0 * hs, out + h1 * hs, 0.0f);
  for (int64_t s = start; s <= end; ++s) {  // weighted sums accumulated in out, slot by slot
    const KV* vr = v + slots[s] * stride;
    if (s + ahead <= end) prefetch_slot(v, slots[s + ahead], stride, head_stride, j0, j1, hs);
    for (int64_t h = h0; h < h1; ++h) {
      const float p = *sc(s, h);
      const __m256 vp = _mm256_set1_ps(p);
      const KV* vh = vr + (h / group) * head_stride;
      float* oh = out + h * hs;
      for (int64_t d = 0; d < hs8; d += 8)
        _mm256_storeu_ps(oh + d, _mm256_fmadd_ps(vp, load8(vh + d), _mm256_loadu_ps(oh + d)));
      for (int64_t d = hs8; d < hs; ++d) oh[d] += p * widen(vh[d]);
    }
  }
  for (int64_t h = h0; h < h1; ++h)
    for (int64_t d = 0; d < hs; ++d) out[h * hs + d] *= inv[h - h0];
}

// LayerNorm (mean and variance) or, with rms, RMSNorm (x / sqrt(mean(x^2) + eps) * g) of B rows of C; x itself
// where the model has no norm there (an empty g). out may be x. The sums are double, four lanes at a time (the
// rows' statistics as exact as the scalar double loop gave them, 8x fewer dependent adds: 13 norms of 32 x 384
// took 0.27 ms of a 7 ms step that way).
inline double hsum(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

void norm(const float* x, int64_t B, int64_t C, const at::Tensor& g, const at::Tensor& beta, float eps, bool rms,
          float* out) {
  if (!present(g)) {
    if (out != x) std::copy(x, x + B * C, out);
    return;
  }
  const float* gp = g.data_ptr<float>();
  const float* bp = present(beta) ? beta.data_ptr<float>() : nullptr;
  const int64_t C8 = C - C % 8;
  at::parallel_for(0, B, 8, [&](int64_t begin, int64_t end) {  // rows split across threads from 16 rows on
    for (int64_t b = begin; b < end; ++b) {
      const float* r = x + b * C;
      double mean = 0;
      if (!rms) {
        __m256d a = _mm256_setzero_pd(), c = a;
        for (int64_t i = 0; i < C8; i += 8) {
          a = _mm256_add_pd(a, _mm256_cvtps_pd(_mm_loadu_ps(r + i)));
          c = _mm256_add_pd(c, _mm256_cvtps_pd(_mm_loadu_ps(r + i + 4)));
        }
        mean = hsum(_mm256_add_pd(a, c));
        for (int64_t i = C8; i < C; ++i) mean += r[i];
        mean /= C;
      }
      const __m256d m = _mm256_set1_pd(mean);
      __m256d a = _mm256_setzero_pd(), c = a;
      for (int64_t i = 0; i < C8; i += 8) {
        const __m256d u = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(r + i)), m);
        const __m256d w = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(r + i + 4)), m);
        a = _mm256_fmadd_pd(u, u, a);
        c = _mm256_fmadd_pd(w, w, c);
      }
      double var = hsum(_mm256_add_pd(a, c));
      for (int64_t i = C8; i < C; ++i) var += (r[i] - mean) * (r[i] - mean);
      const float inv = 1.0f / std::sqrt(static_cast<float>(var / C) + eps);
      const __m256 vm = _mm256_set1_ps(static_cast<float>(mean)), vinv = _mm256_set1_ps(inv);
      float* o = out + b * C;
      for (int64_t i = 0; i < C8; i += 8) {
        const __m256 t = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(r + i), vm), vinv),
                                       _mm256_loadu_ps(gp + i));
        _mm256_storeu_ps(o + i, bp ? _mm256_add_ps(t, _mm256_loadu_ps(bp + i)) : t);
      }
      for (int64_t i = C8; i < C; ++i) o[i] = (r[i] - static_cast<float>(mean)) * inv * gp[i] + (bp ? bp[i] : 0.0f);
    }
  });
}

// Rotary embedding in place on n heads of hs at v: pairs (i, i + rot/2) of each head's first rot dims turned by
// the angles of one position (rot < hs: partial rotary, the rest passes).
void rotate(float* v, int64_t n, int64_t hs, int64_t rot, const float* cos, const float* sin) {
  const int64_t half = rot / 2;
  for (int64_t h = 0; h < n; ++h, v += hs) {
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = v[i], x2 = v[i + half];
      v[i] = x1 * cos[i] - x2 * sin[i];
      v[i + half] = x2 * cos[i] + x1 * sin[i];
    }
  }
}

// Gated MLPs: out[r, i] = f(gate[r, i]) * up[r, i] for rows of [gate (I); up (I)]; f is silu (SwiGLU) or the
// tanh GELU (GeGLU, Gemma), computed as `activate` computes it.
void gated(const float* in, int64_t R, int64_t I, float* out, int act) {
  for (int64_t r = 0; r < R; ++r) {
    const float *g = in + r * 2 * I, *u = g + I;
    float* o = out + r * I;
    if (act == kGeGLUTanh) {
      std::copy(g, g + I, o);
      activate(o, I, kGeluTanh);
      for (int64_t i = 0; i < I; ++i) o[i] *= u[i];
      continue;
    }
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) {
      const __m256 gv = _mm256_loadu_ps(g + i);
      const __m256 sig = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f),
                                                                            vexp(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
    }
    for (; i < I; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

// out[r] (+)= row ids[r] of an embedding table of C columns, float32 or bfloat16, for R rows.
void embed_rows(const at::Tensor& table, const int64_t* ids, int64_t R, int64_t C, float* out, bool add) {
  TORCH_CHECK(table.scalar_type() == at::kFloat || table.scalar_type() == at::kBFloat16,
              "embeddings must be float32 or bfloat16");
  const float* f32 = table.scalar_type() == at::kFloat ? table.data_ptr<float>() : nullptr;
  const at::BFloat16* b16 = f32 ? nullptr : table.data_ptr<at::BFloat16>();
  for (int64_t r = 0; r < R; ++r) {
    float* o = out + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const float e = f32 ? f32[ids[r] * C + c] : static_cast<float>(b16[ids[r] * C + c]);
      o[c] = add ? o[c] + e : e;
    }
  }
}

// n floats into a KV cache row: float32 as they are, float16 rounded to nearest even by F16C (as torch's
// .to(torch.float16) rounds), bfloat16 by c10's rounding (torch's own).
inline void store(const float* x, int64_t n, float* out) { std::copy(x, x + n, out); }
inline void store(const float* x, int64_t n, at::Half* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) out[i] = static_cast<at::Half>(x[i]);
}
inline void store(const float* x, int64_t n, at::BFloat16* out) { std::copy(x, x + n, out); }

// Working memory kept between calls: floats(i, n) and ints(i, n) are buffer i, grown to at least n (never shrunk,
// never cleared).
struct Scratch {
  std::vector<float> f[8];
  std::vector<int64_t> i[2];
  float* floats(int k, int64_t n) {
    if (static_cast<int64_t>(f[k].size()) < n) f[k].resize(n);
    return f[k].data();
  }
  int64_t* ints(int k, int64_t n) {
    if (static_cast<int64_t>(i[k].size()) < n) i[k].resize(n);
    return i[k].data();
  }
};

}  // namespace

// ---------------------------------------------------------------------------------- many LoRA adapters at once
// S-LoRA / Punica on a CPU: after a linear layer's base product, each row whose request uses adapter s adds that
// adapter's low-rank product, y_r += (x_r . A_s^T) Bt_s, with A (N, rank, K) and Bt (N, rank, out) float32 (the
// scale folded into Bt, ranks padded with zeros: lmforge.infer.multi_lora stacks them). Rows come in groups of
// `per` sharing one slot (a request's T new tokens in the layers, its `last` ones at the head); slot -1 is the base,
// to which nothing is added. Each row's sums run in one fixed order, so a row's result does not depend on the batch.
inline float dot_f32(const float* a, const float* b, int64_t n) {  // four chains: not bound by the FMA latency
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t k = 0;
  for (; k + 32 <= n; k += 32)
    for (int u = 0; u < 4; ++u)
      acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8 * u), _mm256_loadu_ps(b + k + 8 * u), acc[u]);
  for (; k + 8 <= n; k += 8) acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc[0]);
  float v = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; k < n; ++k) v += a[k] * b[k];
  return v;
}

// y[c] += sum_j t[j] * bt[j * out + c] for c < out: y read and written once, four column blocks at a time.
inline void add_low_rank(const float* t, int64_t rank, const float* bt, int64_t out, float* y) {
  int64_t c = 0;
  for (; c + 32 <= out; c += 32) {
    __m256 acc[4];
    for (int u = 0; u < 4; ++u) acc[u] = _mm256_loadu_ps(y + c + 8 * u);
    for (int64_t j = 0; j < rank; ++j) {
      const __m256 tj = _mm256_set1_ps(t[j]);
      for (int u = 0; u < 4; ++u) acc[u] = _mm256_fmadd_ps(tj, _mm256_loadu_ps(bt + j * out + c + 8 * u), acc[u]);
    }
    for (int u = 0; u < 4; ++u) _mm256_storeu_ps(y + c + 8 * u, acc[u]);
  }
  for (; c < out; ++c) {
    float v = y[c];
    for (int64_t j = 0; j < rank; ++j) v += t[j] * bt[j * out + c];
    y[c] = v;
  }
}

struct Lora {
  const std::vector<at::Tensor>* stacks = nullptr;  // per layer (A, Bt) of qkv, proj, fc, mlp_proj; then the head's
  const int64_t* slots = nullptr;                   // each request's adapter slot (B,), or none: all the base

  bool on(int64_t i) const { return slots != nullptr && present((*stacks)[2 * i]); }

  // y[r, :] += (x[r, :] . A_s^T) Bt_s for the rows r of layer product i whose slot s = slots[request[r]] >= 0,
  // grouped by adapter (Punica's SGMV): each rank-row of A_s and of Bt_s is read once for all of s's rows.
  void add(int64_t i, const float* x, int64_t R, const int64_t* request, int64_t K, float* y, int64_t ldy) const {
    if (!on(i)) return;
    const at::Tensor& A = (*stacks)[2 * i];
    const at::Tensor& Bt = (*stacks)[2 * i + 1];
    const int64_t N = A.size(0), rank = A.size(1), out = Bt.size(2);
    TORCH_CHECK(A.size(2) == K && Bt.size(0) == N && Bt.size(1) == rank && A.is_contiguous() &&
                Bt.is_contiguous() && A.scalar_type() == at::kFloat && Bt.scalar_type() == at::kFloat,
                "LoRA stacks do not fit layer product ", i, ": A ", A.sizes(), ", Bt ", Bt.sizes(), ", K ", K);
    std::vector<std::vector<int64_t>> rows(N);  // each adapter's rows, in order
    for (int64_t r = 0; r < R; ++r) {
      const int64_t s = slots[request[r]];
      TORCH_CHECK(s < N, "LoRA slot ", s, " of row ", request[r], " is past the ", N, " adapters stacked");
      if (s >= 0) rows[s].push_back(r);
    }
    const float* a = A.data_ptr<float>();
    const float* bt = Bt.data_ptr<float>();
    at::parallel_for(0, N, 1, [&](int64_t s0, int64_t s1) {
      std::vector<float> t;
      for (int64_t s = s0; s < s1; ++s) {
        const std::vector<int64_t>& g = rows[s];
        const int64_t n = static_cast<int64_t>(g.size());
        if (n == 0) continue;
        t.resize(n * rank);
        const float* as = a + s * rank * K;
        for (int64_t j = 0; j < rank; ++j)
          for (int64_t m = 0; m < n; ++m) t[m * rank + j] = dot_f32(x + g[m] * K, as + j * K, K);
        const float* bs = bt + s * rank * out;
        for (int64_t m = 0; m < n; ++m) add_low_rank(t.data() + m * rank, rank, bs, out, y + g[m] * ldy);
      }
    });
  }
};

// params: per layer [ln1 w, b; qkv w, s, b; proj w, s, b; ln2 w, b; fc w, s, b; mlp_proj w, s, b] (16), then
// [tok_emb, pos_emb (empty with rotary positions), lnf w, b; head w, s, b]; a linear's w is float32 (its s
// undefined), int8 with float32 per-row scales s, 4-bit (uint8 (N, K/2)) with float16 block scales s (N, K/32),
// or packed for oneDNN; an absent bias is an empty tensor, an
// absent norm an empty weight (OLMo 2 has no input norms). Norms, biases and rotary tables are float32,
// embeddings float32 or bfloat16.
// norms: per layer [q_norm w, k_norm w, post_norm1 w, b, post_norm2 w, b] (6): RMSNorm of q and k before RoPE,
// per head (a weight of head_dim) or over the projection (of n_head * head_dim, n_kv_head * head_dim); norms of
// the attention and MLP outputs before their residual adds (Gemma's sandwich, OLMo 2); empty where absent.
// ropes: [cos, sin, local cos, local sin, long cos, long sin], each (max_pos, rot / 2), rot the rotary dims of a
// head; windowed layers turn by the local tables when present; rows flagged in long_rows (B,) turn by the long ones
// (LongRoPE: a sequence past its original context; empty: none). Empty without rotary positions.
// windows: per layer, a query sees the last windows[l] slots up to itself (0: all).
// scalars: [attention score scale (0: 1 / sqrt(head_dim)), attention soft-cap (0: none), logit soft-cap (0: none),
// embedding multiplier (0: none)].
// tokens: (B, T) new tokens per row, of which row b feeds its first lengths[b] (lengths empty: all T; rows of
// different lengths share the call without computing their padding: the speculative check of proposals of
// different lengths beside plain one-token rows). New token t of row b goes to the row's slot start[b] + t, sits
// at position start[b] + t - lo[b] and attends to the row's slots lo[b]..start[b] + t (a slot before lo[b] sees
// itself only).
// The KV cache is lmforge's contiguous one, kcache/vcache (n_layer, B, n_kv_head, max_len, head_dim), with an empty
// block_table; or the serving engine's paged pool, (n_layer, num_blocks, block_size, n_kv_head, head_dim), where
// block_table (B, blocks) lists each row's blocks in order. Returns the logits of each row's last `last` tokens,
// (B, last, vocab); a row of n < last tokens has logits of all n at 0..n - 1, zeros after them. `lora`: LoRA
// adapters added per row (struct Lora), or none.
template <typename KV>
at::Tensor forward_step_kv(const at::Tensor& tokens, const at::Tensor& lengths, const at::Tensor& lo,
                           const at::Tensor& start, int64_t last,
                        at::Tensor kcache, at::Tensor vcache, const at::Tensor& block_table,
                        const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& norms, int64_t n_head,
                        double eps, int64_t act, bool rms, const std::vector<at::Tensor>& ropes,
                        const at::Tensor& long_rows, const std::vector<int64_t>& windows,
                        const std::vector<double>& scalars, const Lora& lora) {
  const int64_t B = tokens.size(0), T = tokens.size(1);
  const bool paged = present(block_table);
  const int64_t L = kcache.size(0), nkv = kcache.size(paged ? 3 : 2), hs = kcache.size(4);
  const at::Tensor* top = params.data() + 16 * L;  // tok_emb, pos_emb, lnf w, b, head w, s, b
  const at::Tensor& tok_emb = top[0];
  const at::Tensor& pos_emb = top[1];
  const int64_t C = tok_emb.size(1), A = n_head * hs, group = n_head / nkv, qkv_dim = A + 2 * nkv * hs;
  const bool gate = act == kSwiGLU || act == kGeGLUTanh;
  const int64_t ffn = params[10].size(0), inner = gate ? ffn / 2 : ffn;  // gated: [gate; up] rows
  TORCH_CHECK(ropes.size() == 6 && norms.size() == static_cast<size_t>(6 * L) &&
              windows.size() == static_cast<size_t>(L) && scalars.size() == 4,
              "forward_step wants 6 rope tables, 6 norms and a window per layer, and 4 scalars");
  const bool rope = present(ropes[0]);
  const int64_t rot = rope ? 2 * ropes[0].size(1) : 0;
  TORCH_CHECK(rot <= hs, "rotary tables of ", rot, " dims do not fit heads of ", hs);
  const float attn_scale = scalars[0] > 0 ? static_cast<float>(scalars[0]) : 1.0f / std::sqrt(static_cast<float>(hs));
  const float attn_softcap = static_cast<float>(scalars[1]), logit_softcap = static_cast<float>(scalars[2]);
  const float embed_scale = static_cast<float>(scalars[3]);
  TORCH_CHECK(tokens.is_contiguous() && lo.is_contiguous() && start.is_contiguous() && kcache.is_contiguous() &&
              vcache.is_contiguous() && (!paged || block_table.is_contiguous()),
              "forward_step wants contiguous tokens, lo, start, caches and block table");
  TORCH_CHECK(last >= 1 && last <= T, "last=", last, " must be in 1..", T);
  const int64_t* lp = lo.data_ptr<int64_t>();
  const int64_t* sp = start.data_ptr<int64_t>();
  TORCH_CHECK(!present(lengths) || (lengths.numel() == B && lengths.scalar_type() == at::kLong &&
                                     lengths.is_contiguous()), "lengths wants an int64 per row");
  std::vector<int64_t> len(B, T);  // each row's new tokens
  if (present(lengths))
    for (int64_t b = 0; b < B; ++b) {
      len[b] = lengths.data_ptr<int64_t>()[b];
      TORCH_CHECK(len[b] >= 1 && len[b] <= T, "row ", b, " feeds ", len[b], " tokens: must be in 1..", T);
    }
  // The step's rows r are the fed tokens (b, t), b-major: row_b[r], row_t[r]; padding is no row.
  std::vector<int64_t> row_b, row_t;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < len[b]; ++t) row_b.push_back(b), row_t.push_back(t);
  const int64_t R = static_cast<int64_t>(row_b.size());
  const int64_t vocab = tok_emb.size(0);
  const int64_t max_pos = present(pos_emb) ? pos_emb.size(0) : rope ? ropes[0].size(0) : INT64_MAX;

  // Where slot s of row b lives: kc + layer * layer_stride + slot_of[b][s] * row_stride + kv_head * head_stride.
  // Contiguous: row b's slots are consecutive in its (b, kv_head) plane. Paged: a slot is block * bs + offset.
  const int64_t bs = paged ? kcache.size(2) : kcache.size(3);  // slots per block; contiguous: one block a row
  const int64_t blocks = paged ? block_table.size(1) : 1;
  const int64_t capacity = blocks * bs;
  const int64_t row_stride = paged ? nkv * hs : hs, head_stride = paged ? hs : bs * hs;
  const int64_t layer_stride = kcache.stride(0);
  const int64_t* table = paged ? block_table.data_ptr<int64_t>() : nullptr;
  int64_t width = 0;  // the longest row's slots
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = sp[b] + len[b];
    TORCH_CHECK(n <= capacity, "KV cache is full: ", n, " tokens do not fit in ", capacity, " slots");
    TORCH_CHECK(n - lp[b] <= max_pos, "positions up to ", n - lp[b], " exceed the model's context of ", max_pos);
    width = std::max(width, n);
  }
  TORCH_CHECK(!present(long_rows) || (long_rows.numel() == B && long_rows.scalar_type() == at::kBool &&
                                       present(ropes[4])), "long_rows wants a bool per row and long rope tables");
  const bool* long_row = present(long_rows) ? long_rows.data_ptr<bool>() : nullptr;
  std::vector<int64_t> ids(R);  // the rows' token ids
  for (int64_t r = 0; r < R; ++r) {
    ids[r] = tokens.data_ptr<int64_t>()[row_b[r] * T + row_t[r]];
    TORCH_CHECK(ids[r] >= 0 && ids[r] < vocab, "token id ", ids[r], " is outside the vocabulary 0..", vocab - 1);
  }

  // The step's working memory, this thread's and kept between calls: a step allocates and zero-fills nothing
  // (every buffer is written in full before it is read).
  thread_local Scratch scratch;
  float* x = scratch.floats(0, R * C);
  float* h = scratch.floats(1, R * std::max(C, A));
  float* qkv = scratch.floats(2, R * qkv_dim);
  float* att = scratch.floats(3, R * std::max(C, A));  // (the head's rows use it at the end: C wide)
  float* ff = scratch.floats(4, R * ffn);
  float* gated_ff = scratch.floats(5, gate ? R * inner : 0);
  float* out = scratch.floats(6, R * C);
  int64_t* pos = scratch.ints(0, R);
  int64_t* slot_of = scratch.ints(1, B * width);  // row b's slots: slot_of[b * width + s]
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < sp[b] + len[b]; ++s)
      slot_of[b * width + s] = (paged ? table[b * blocks + s / bs] : b * nkv) * bs + s % bs;
  for (int64_t r = 0; r < R; ++r) pos[r] = std::max<int64_t>(sp[row_b[r]] + row_t[r] - lp[row_b[r]], 0);
  embed_rows(tok_emb, ids.data(), R, C, x, false);
  if (embed_scale > 0)
    for (int64_t i = 0; i < R * C; ++i) x[i] *= embed_scale;
  if (present(pos_emb)) embed_rows(pos_emb, pos, R, C, x, true);
  KV* kc = kcache.data_ptr<KV>();
  KV* vc = vcache.data_ptr<KV>();

  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* P = params.data() + 16 * l;
    const at::Tensor* N = norms.data() + 6 * l;
    const int64_t window = windows[l];
    norm(x, R, C, P[0], P[1], eps, rms, h);
    linear(h, R, C, P[2], P[3], P[4], qkv);
    lora.add(4 * l, h, R, row_b.data(), C, qkv, qkv_dim);
    if (present(N[0])) {  // q and k normed per head (a weight of hs) or over each projection
      const bool per_head = N[0].numel() == hs;
      for (int64_t r = 0; r < R; ++r) {
        float* q = qkv + r * qkv_dim;
        norm(q, per_head ? n_head : 1, per_head ? hs : A, N[0], at::Tensor(), eps, true, q);
        norm(q + A, per_head ? nkv : 1, per_head ? hs : nkv * hs, N[1], at::Tensor(), eps, true, q + A);
      }
    }
    if (rope) {
      const bool local = window > 0 && present(ropes[2]);
      for (int64_t r = 0; r < R; ++r) {  // queries and keys turned by their positions
        const int64_t which = local ? 2 : long_row && long_row[row_b[r]] ? 4 : 0;
        const float* c = ropes[which].data_ptr<float>() + pos[r] * (rot / 2);
        const float* sn = ropes[which + 1].data_ptr<float>() + pos[r] * (rot / 2);
        rotate(qkv + r * qkv_dim, n_head + nkv, hs, rot, c, sn);
      }
    }
    KV* kl = kc + l * layer_stride;
    KV* vl = vc + l * layer_stride;
    for (int64_t r = 0; r < R; ++r) {  // the new keys and values into the cache
      const int64_t b = row_b[r], off = slot_of[b * width + sp[b] + row_t[r]] * row_stride;
      for (int64_t kvh = 0; kvh < nkv; ++kvh) {
        const float* kn = qkv + r * qkv_dim + A + kvh * hs;
        store(kn, hs, kl + off + kvh * head_stride);
        store(kn + nkv * hs, hs, vl + off + kvh * head_stride);
      }
    }
    // Tasks are (row, group of heads): whole rows when there are enough of them to share out, single heads when
    // few rows (one sequence decoding) must still keep every thread busy.
    const int64_t wanted = std::min<int64_t>(n_head, (4 * at::get_num_threads() + R - 1) / R);  // tasks a row
    const int64_t per = (n_head + wanted - 1) / wanted, groups = (n_head + per - 1) / per;  // none left empty
    at::parallel_for(0, R * groups, 1, [&](int64_t begin, int64_t end) {
      thread_local Scratch local;  // (a worker thread's own)
      float* score = local.floats(0, per * capacity);
      float* inv = local.floats(1, per);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r = task / groups, h0 = task % groups * per, h1 = std::min(n_head, h0 + per);
        const int64_t b = row_b[r], self = sp[b] + row_t[r];
        const int64_t first = window > 0 ? std::max(lp[b], self - window + 1) : lp[b];  // the window's first slot
        attend(qkv + r * qkv_dim, kl, vl, slot_of + b * width, row_stride, head_stride, std::min(first, self), self,
               h0, h1, group, hs, attn_scale, attn_softcap, score, capacity, inv, att + r * A);
      }
    });
    if (present(N[2])) {  // the attention output normed before its residual add
      linear(att, R, A, P[5], P[6], P[7], out);
      lora.add(4 * l + 1, att, R, row_b.data(), A, out, C);
      norm(out, R, C, N[2], N[3], eps, rms, out);
      for (int64_t i = 0; i < R * C; ++i) x[i] += out[i];
    } else {
      linear(att, R, A, P[5], P[6], P[7], x, /*accumulate=*/true);
      lora.add(4 * l + 1, att, R, row_b.data(), A, x, C);
    }
    norm(x, R, C, P[8], P[9], eps, rms, h);
    float* mlp_out = present(N[4]) ? out : x;
    if (gate) {
      linear(h, R, C, P[10], P[11], P[12], ff);
      lora.add(4 * l + 2, h, R, row_b.data(), C, ff, ffn);
      gated(ff, R, inner, gated_ff, static_cast<int>(act));
      linear(gated_ff, R, inner, P[13], P[14], P[15], mlp_out, /*accumulate=*/!present(N[4]));
      lora.add(4 * l + 3, gated_ff, R, row_b.data(), inner, mlp_out, C);
    } else {
      const bool fc_lora = lora.on(4 * l + 2);  // the adapter's product goes in before the activation
      linear(h, R, C, P[10], P[11], P[12], ff, false, fc_lora ? kNone : static_cast<int>(act));
      if (fc_lora) {
        lora.add(4 * l + 2, h, R, row_b.data(), C, ff, ffn);
        activate(ff, R * ffn, static_cast<int>(act));
      }
      linear(ff, R, ffn, P[13], P[14], P[15], mlp_out, /*accumulate=*/!present(N[4]));
      lora.add(4 * l + 3, ff, R, row_b.data(), ffn, mlp_out, C);
    }
    if (present(N[4])) {  // the MLP output normed before its residual add
      norm(out, R, C, N[4], N[5], eps, rms, out);
      for (int64_t i = 0; i < R * C; ++i) x[i] += out[i];
    }
  }
  float* tail = att;  // the rows that go through the head (att is free now): each row's last min(last, len) tokens
  std::vector<int64_t> head_b, head_at;  // a head row's request, and where its logits go in (B, last)
  for (int64_t b = 0, first = 0; b < B; first += len[b], ++b)
    for (int64_t j = 0, n = std::min(last, len[b]); j < n; ++j) {
      std::copy(x + (first + len[b] - n + j) * C, x + (first + len[b] - n + j + 1) * C, tail + head_b.size() * C);
      head_b.push_back(b), head_at.push_back(b * last + j);
    }
  const int64_t H = static_cast<int64_t>(head_b.size()), V = top[4].size(0);
  norm(tail, H, C, top[2], top[3], eps, rms, h);
  const bool dense = H == B * last;  // every row has `last` tokens: the logits are written in place
  const auto options = tokens.options().dtype(at::kFloat);
  at::Tensor logits = dense ? at::empty({B, last, V}, options) : at::zeros({B, last, V}, options);
  float* lg = dense ? logits.data_ptr<float>() : scratch.floats(7, H * V);
  linear(h, H, C, top[4], top[5], top[6], lg);
  lora.add(4 * L, h, H, head_b.data(), C, lg, V);  // before the soft-cap
  if (logit_softcap > 0)
    for (int64_t i = 0; i < H * V; ++i) lg[i] = std::tanh(lg[i] / logit_softcap) * logit_softcap;
  if (!dense)
    for (int64_t i = 0; i < H; ++i) std::copy(lg + i * V, lg + (i + 1) * V, logits.data_ptr<float>() + head_at[i] * V);
  return logits;
}

// lora_stacks: empty, or per layer [A, Bt] of qkv, proj, fc, mlp_proj (an empty A where no adapter adapts that
// product), then the head's [A, Bt] (struct Lora); lora_slots (B,) int64, each row's adapter slot (-1: none).
at::Tensor forward_step(const at::Tensor& tokens, const at::Tensor& lengths, const at::Tensor& lo,
                        const at::Tensor& start, int64_t last,
                        at::Tensor kcache, at::Tensor vcache, const at::Tensor& block_table,
                        const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& norms, int64_t n_head,
                        double eps, int64_t act, bool rms, const std::vector<at::Tensor>& ropes,
                        const at::Tensor& long_rows, const std::vector<int64_t>& windows,
                        const std::vector<double>& scalars, const std::vector<at::Tensor>& lora_stacks,
                        const at::Tensor& lora_slots) {
  const auto kv = kcache.scalar_type();
  TORCH_CHECK(vcache.scalar_type() == kv && (kv == at::kFloat || kv == at::kHalf || kv == at::kBFloat16),
              "forward_step wants a float32, float16 or bfloat16 KV cache");
  auto step = kv == at::kHalf ? forward_step_kv<at::Half>
              : kv == at::kBFloat16 ? forward_step_kv<at::BFloat16> : forward_step_kv<float>;
  Lora lora;
  if (!lora_stacks.empty() && present(lora_slots)) {
    TORCH_CHECK(static_cast<int64_t>(lora_stacks.size()) == 8 * kcache.size(0) + 2 &&
                lora_slots.scalar_type() == at::kLong && lora_slots.is_contiguous() &&
                lora_slots.numel() == tokens.size(0), "LoRA: 8 stacks a layer and 2 for the head, one slot a row");
    lora.stacks = &lora_stacks;
    lora.slots = lora_slots.data_ptr<int64_t>();
  }
  return step(tokens, lengths, lo, start, last, kcache, vcache, block_table, params, norms, n_head, eps, act, rms, ropes,
              long_rows, windows, scalars, lora);
}

// act(x @ (w * scale[:, None]).T + bias) for x (B, K): the step's matrix product on its own, for tests and benchmarks.
at::Tensor linear_act(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& bias,
                      int64_t act) {
  const int64_t K = w.scalar_type() == at::kByte ? 2 * w.size(1) : w.size(1);  // 4-bit: two values a byte
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (w.is_mkldnn() || w.is_contiguous()) && x.size(1) == K,
              "linear_act wants contiguous x (B, K) and w (N, K) (4-bit: (N, K/2))");
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  linear(x.data_ptr<float>(), x.size(0), x.size(1), w, scale, bias, y.data_ptr<float>(), false,
         static_cast<int>(act));
  return y;
}

// Both run without Python's lock (they touch no Python object), so a server's other threads go on while a step
// computes.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_act", &linear_act, "act(x @ w.T + bias) with the decode step's kernel",
        py::call_guard<py::gil_scoped_release>());
  m.def("dequantize_q4", &dequantize_q4, "the float weight (N, K) of 4-bit weights and float16 group scales",
        py::call_guard<py::gil_scoped_release>());
  m.def("forward_step", &forward_step, "new tokens through a GPT-style model and its KV cache, fused",
        py::call_guard<py::gil_scoped_release>());
}
