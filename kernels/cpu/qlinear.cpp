// Weight-only quantized linear layers for the CPU: y[M, N] = x[M, K] @ W[N, K]^T, with W kept in
// GGUF's block formats (32 weights a block), never dequantised into a float copy of W. Built for
// few rows (decode: M = 1 to 16).
//
//   Q8_0: fp16 d, int8 q[32]           w = d * q
//   Q4_0: fp16 d, uint8 qs[16]         w = d * (nibble - 8); low nibbles are weights 0-15, high 16-31
//   Q4_1: fp16 d, fp16 m, uint8 qs[16] w = d * nibble + m
//
// Two paths:
// - float: each block's 32 weights become float vectors in registers, which every row of x then
//   multiplies in fp32 (the dequantisation is paid once per block for all M rows). Exact to
//   summation order.
// - int8 activations (LOOM_CPU_INT8_ACT=1, where the CPU has AVX2; llama.cpp's q8_0 / q8_1 "vec_dot_type"):
//   each row of x is quantized once per call into 32-blocks of int8 with a scale, and a block of
//   weights meets it in integer dot products (AVX512-VNNI vpdpbusd, 64 weights an instruction, or
//   AVX2 maddubs), one float multiply-add per block. A dequantise-and-FMA step is compute bound on
//   these sizes; this does several times fewer instructions a weight, at ~1e-2 relative error.
// Output rows are split over torch's threads.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <immintrin.h>

#include "qlinear.h"

namespace {
using loom::block_bytes;

using loom::Q4_0;
using loom::Q4_1;
using loom::Q8_0;
using loom::QK;

inline float fp16_to_fp32(uint16_t h) { return _cvtsh_ss(h); }

// The 32 weights of one block, as floats.
inline void dequant_block_scalar(const uint8_t* b, int qtype, float* w) {
  uint16_t dh;
  std::memcpy(&dh, b, 2);
  const float d = fp16_to_fp32(dh);
  if (qtype == Q8_0) {
    const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
    for (int i = 0; i < QK; ++i) w[i] = d * q[i];
  } else if (qtype == Q4_0) {
    const uint8_t* qs = b + 2;
    for (int i = 0; i < 16; ++i) {
      w[i] = d * (float)((qs[i] & 0x0F) - 8);
      w[i + 16] = d * (float)((qs[i] >> 4) - 8);
    }
  } else {
    uint16_t mh;
    std::memcpy(&mh, b + 2, 2);
    const float m = fp16_to_fp32(mh);
    const uint8_t* qs = b + 4;
    for (int i = 0; i < 16; ++i) {
      w[i] = d * (float)(qs[i] & 0x0F) + m;
      w[i + 16] = d * (float)(qs[i] >> 4) + m;
    }
  }
}

#if defined(__AVX512F__)
constexpr int VEC = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }

// One block's weights as two vectors.
inline void dequant_block(const uint8_t* b, int qtype, vec* w) {
  uint16_t dh;
  std::memcpy(&dh, b, 2);
  const vec d = _mm512_set1_ps(fp16_to_fp32(dh));
  if (qtype == Q8_0) {
    const __m128i* q = reinterpret_cast<const __m128i*>(b + 2);
    w[0] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))));
    w[1] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))));
    return;
  }
  const int off = qtype == Q4_0 ? 2 : 4;
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + off)));
  const __m512i lo = _mm512_and_si512(bytes, _mm512_set1_epi32(0x0F));
  const __m512i hi = _mm512_srli_epi32(bytes, 4);
  if (qtype == Q4_0) {
    const __m512i eight = _mm512_set1_epi32(8);
    w[0] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, eight)));
    w[1] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, eight)));
  } else {
    uint16_t mh;
    std::memcpy(&mh, b + 2, 2);
    const vec m = _mm512_set1_ps(fp16_to_fp32(mh));
    w[0] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lo), m);
    w[1] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(hi), m);
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int VEC = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

inline void dequant_block(const uint8_t* b, int qtype, vec* w) {
  alignas(32) float tmp[QK];
  dequant_block_scalar(b, qtype, tmp);
  for (int i = 0; i < QK / VEC; ++i) w[i] = _mm256_load_ps(tmp + i * VEC);
}
#else
#define LOOM_QLINEAR_SCALAR 1
#endif

// Output rows per thread at least: 64 KiB of blocks (and 16 rows). Waking a second thread costs
// microseconds, and far more when the machine is oversubscribed and it must wait for a core; a small
// layer (a tiny model's, or a few hundred rows of a 135M model's narrow ones) is read sooner by one.
inline int64_t grain(int64_t row_bytes) { return std::max<int64_t>(16, (64 << 10) / std::max<int64_t>(row_bytes, 1)); }

#ifndef LOOM_QLINEAR_SCALAR
// Rows [m0, m0 + MB) of x against output rows [n0, n1).
template <int MB>
void rows_block(const float* x, int64_t K, const uint8_t* W, int64_t row_bytes, int qtype, int bb, int64_t n0,
                int64_t n1, float* y, int64_t N) {
  constexpr int NV = QK / VEC;
  const int64_t blocks = K / QK;
  for (int64_t n = n0; n < n1; ++n) {
    vec acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = vzero();
    const uint8_t* row = W + n * row_bytes;
    for (int64_t j = 0; j < blocks; ++j) {
      vec w[NV];
      dequant_block(row + j * bb, qtype, w);
      const float* xj = x + j * QK;
      for (int m = 0; m < MB; ++m)
        for (int v = 0; v < NV; ++v) acc[m] = vfma(w[v], vload(xj + m * K + v * VEC), acc[m]);
    }
    for (int m = 0; m < MB; ++m) y[m * N + n] = vsum(acc[m]);
  }
}

// Output rows split over torch's own intra-op threads (at::parallel_for), so the kernel shares
// torch's thread pool and its set_num_threads instead of starting an OpenMP team of its own.
template <int MB>
void run_rows(const float* x, int64_t K, const uint8_t* W, int64_t row_bytes, int qtype, int bb, int64_t N, float* y) {
  at::parallel_for(0, N, grain(row_bytes), [&](int64_t n0, int64_t n1) { rows_block<MB>(x, K, W, row_bytes, qtype, bb, n0, n1, y, N); });
}
#endif


// ---- int8 activations ----------------------------------------------------------------------------
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define LOOM_INT8_512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define LOOM_INT8_256 1
#endif

#if defined(LOOM_INT8_512) || defined(LOOM_INT8_256)
// The rows of x quantized to int8 in 32-blocks (llama.cpp's q8_1): d = max|x| / 127, q = round(x / d),
// and d * sum(q), which carries Q4_0's -8 and Q4_1's minimum (w = d_w * nibble + c: the c part of a
// block's dot product is c * d_x * sum(q)). Per-block values are padded with zeros to a multiple of 16.
//
// With VNNI the quants are stored by groups of 4 blocks, 128 bytes: the 4 blocks' weights 0-15, then
// their weights 16-31, as a Q4 group's 4 x 16 bytes of nibbles unpack (low, then high). Two vpdpbusd
// then give the group's dot products in 16 int32 lanes, 4 a block, which meet the 4 blocks' scales
// in one convert and one multiply-add. (A pair of blocks a vector costs a convert, a permute and a
// multiply-add every 64 weights, which ran no faster than the float path; 16 blocks a vector from
// vpgatherdd ran slower still on AMD, whose gathers are slow.)
// With AVX2, blocks in order.
struct QuantRows {
  int64_t nb = 0, q_stride = 0, s_stride = 0;
  std::vector<int8_t> q;     // [M, q_stride]
  std::vector<float> d;      // [M, s_stride]: the blocks' scales
  std::vector<float> sums;   // [M, s_stride]: d * sum(q) per block

  void quantize(const float* x, int64_t M, int64_t K) {
    nb = K / QK;
    s_stride = (nb + 15) / 16 * 16;
    q_stride = s_stride * QK;
    q.assign(M * q_stride, 0);
    d.assign(M * s_stride, 0.f);
    sums.assign(M * s_stride, 0.f);
    for (int64_t m = 0; m < M; ++m) {
      int8_t* qm = q.data() + m * q_stride;
      for (int64_t j = 0; j < nb; ++j) {
        const float* xb = x + m * K + j * QK;
        float amax = 0.f;
        for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(xb[i]));
        const float dj = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        int8_t qb[QK];
        int sum = 0;
        for (int i = 0; i < QK; ++i) {
          const float v = xb[i] * id;
          qb[i] = (int8_t)(int)(v + (v >= 0.f ? 0.5f : -0.5f));  // round half away from zero, as llama.cpp
          sum += qb[i];
        }
        d[m * s_stride + j] = dj;
        sums[m * s_stride + j] = dj * (float)sum;
#ifdef LOOM_INT8_512
        int8_t* qg = qm + j / 4 * 128 + j % 4 * 16;
        std::memcpy(qg, qb, 16);
        std::memcpy(qg + 64, qb + 16, 16);
#else
        std::memcpy(qm + j * QK, qb, QK);
#endif
      }
    }
  }
};

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_fp32(h);
}

#ifdef LOOM_INT8_512
// 16 bytes from each of `live` (1-4) blocks bb bytes apart, one a 128-bit lane; zeros for the rest.
template <int bb>
inline __m512i gather4(const uint8_t* p, int live) {
  auto at = [p](int i) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i * bb)); };
  if (live == 4)
    return _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(at(0)), at(1), 1), at(2), 2), at(3), 3);
  __m512i z = _mm512_setzero_si512();
  for (int i = 0; i < live; ++i) {
    const __m128i v = at(i);
    z = i == 0 ? _mm512_inserti32x4(z, v, 0) : i == 1 ? _mm512_inserti32x4(z, v, 1) : _mm512_inserti32x4(z, v, 2);
  }
  return z;
}
#endif

// Rows [m0, m0 + MB) of the quantized x against output rows [n0, n1) of W, in format QT. `c`: scratch
// of a.s_stride floats, zero past the blocks.
template <int QT, int MB>
void int8_rows(const QuantRows& a, int64_t m0, const uint8_t* W, int64_t row_bytes, int64_t n0, int64_t n1, float* y,
               int64_t N, float* c) {
  constexpr int bb = block_bytes(QT);
  constexpr int qoff = QT == Q4_1 ? 4 : 2;
  const int64_t nb = a.nb;
  const int8_t* qx = a.q.data() + m0 * a.q_stride;
  const float* dx = a.d.data() + m0 * a.s_stride;
  const float* sx = a.sums.data() + m0 * a.s_stride;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = W + n * row_bytes;
#ifdef LOOM_INT8_512
    (void)c;
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    const __m512i lanes = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(bb));
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t j0 = 0; j0 < nb; j0 += 16) {
      // The scales of 16 blocks (Q4_1: d and m) in one gather, times each row's d_x.
      const int64_t cnt = std::min<int64_t>(16, nb - j0);
      const __m512i g = _mm512_mask_i32gather_epi32(zero, (__mmask16)((1u << cnt) - 1), lanes, row + j0 * bb, 1);
      const __m512 dv = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));  // 0 in the dead lanes
      __m512 sd[MB];
      for (int m = 0; m < MB; ++m) sd[m] = _mm512_mul_ps(dv, _mm512_loadu_ps(dx + m * a.s_stride + j0));
      if constexpr (QT != Q8_0) {  // the blocks' offsets (-8 d, or m) times d_x * sum(q)
        const __m512 cv = QT == Q4_0 ? _mm512_mul_ps(dv, _mm512_set1_ps(-8.f)) : _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16)));
        for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(cv, _mm512_loadu_ps(sx + m * a.s_stride + j0), acc[m]);
      }
      __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);  // a group's scales, 4 lanes a block
      for (int64_t jg = j0; jg < j0 + cnt; jg += 4, idx = _mm512_add_epi32(idx, _mm512_set1_epi32(4))) {
        const int live = (int)std::min<int64_t>(4, nb - jg);
        const uint8_t* b0 = row + jg * bb + qoff;
        __m512i wlo, whi;
        __mmask64 nlo = 0, nhi = 0;
        if constexpr (QT == Q8_0) {
          wlo = gather4<bb>(b0, live);
          whi = gather4<bb>(b0 + 16, live);
          nlo = _mm512_movepi8_mask(wlo);
          nhi = _mm512_movepi8_mask(whi);
          wlo = _mm512_abs_epi8(wlo);  // vpdpbusd multiplies unsigned by signed: |w| times x with w's sign
          whi = _mm512_abs_epi8(whi);
        } else {
          const __m512i z = gather4<bb>(b0, live), f = _mm512_set1_epi8(0x0F);
          wlo = _mm512_and_si512(z, f);
          whi = _mm512_and_si512(_mm512_srli_epi16(z, 4), f);
        }
        for (int m = 0; m < MB; ++m) {
          const int8_t* xq = qx + m * a.q_stride + jg * QK;
          __m512i xl = _mm512_loadu_si512(xq), xh = _mm512_loadu_si512(xq + 64);
          if constexpr (QT == Q8_0) {
            xl = _mm512_mask_sub_epi8(xl, nlo, zero, xl);
            xh = _mm512_mask_sub_epi8(xh, nhi, zero, xh);
          }
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, wlo, xl), whi, xh);
          acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(idx, sd[m]), acc[m]);
        }
      }
    }
    for (int m = 0; m < MB; ++m) y[m * N + n] = _mm512_reduce_add_ps(acc[m]);
#else
    __m256 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t j = 0; j < nb; ++j) {
      const uint8_t* b = row + j * bb;
      const __m256 dw = _mm256_set1_ps(half_at(b));
      __m256i w;
      if constexpr (QT == Q8_0) {
        w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + qoff));
      } else {
        const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + qoff));
        const __m128i f = _mm_set1_epi8(0x0F);
        w = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(t, f)), _mm_and_si128(_mm_srli_epi16(t, 4), f), 1);
        c[j] = QT == Q4_0 ? -8.f * half_at(b) : half_at(b + 2);
      }
      const __m256i wu = QT == Q8_0 ? _mm256_sign_epi8(w, w) : w;  // maddubs: unsigned times signed
      for (int m = 0; m < MB; ++m) {
        __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + m * a.q_stride + j * QK));
        if constexpr (QT == Q8_0) xq = _mm256_sign_epi8(xq, w);
        const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xq), ones);
        const __m256 sc = _mm256_mul_ps(_mm256_broadcast_ss(dx + m * a.s_stride + j), dw);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sc, acc[m]);
      }
    }
    if constexpr (QT != Q8_0) {  // the blocks' offsets (-8 d, or m) times d_x * sum(q)
      for (int m = 0; m < MB; ++m)
        for (int64_t t = 0; t < a.s_stride; t += 8)
          acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(c + t), _mm256_loadu_ps(sx + m * a.s_stride + t), acc[m]);
    }
    for (int m = 0; m < MB; ++m) {
      __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
      s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      s4 = _mm_add_ss(s4, _mm_shuffle_ps(s4, s4, 1));
      y[m * N + n] = _mm_cvtss_f32(s4);
    }
#endif
  }
}

template <int QT, int MB>
void int8_run(const QuantRows& a, int64_t m0, const uint8_t* W, int64_t row_bytes, int64_t N, float* y) {
  at::parallel_for(0, N, grain(row_bytes), [&](int64_t n0, int64_t n1) {
#ifdef LOOM_INT8_256
    std::vector<float> c(a.s_stride, 0.f);  // zero past nb: the sums there are zero, and 0 * garbage may be NaN
    int8_rows<QT, MB>(a, m0, W, row_bytes, n0, n1, y + m0 * N, N, c.data());
#else
    int8_rows<QT, MB>(a, m0, W, row_bytes, n0, n1, y + m0 * N, N, nullptr);
#endif
  });
}

template <int QT>
void int8_linear(const float* x, int64_t M, int64_t K, const uint8_t* W, int64_t row_bytes, int64_t N, float* y) {
  thread_local QuantRows a;  // reused: a decode step quantizes ~4 activations a layer
  a.quantize(x, M, K);
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) int8_run<QT, 8>(a, m, W, row_bytes, N, y);
  for (; m + 4 <= M; m += 4) int8_run<QT, 4>(a, m, W, row_bytes, N, y);
  for (; m + 2 <= M; m += 2) int8_run<QT, 2>(a, m, W, row_bytes, N, y);
  for (; m < M; ++m) int8_run<QT, 1>(a, m, W, row_bytes, N, y);
}
#endif  // int8 activations

}  // namespace

// y[M, N] = x[M, K] @ dequant(W)^T on raw pointers (qlinear.h): what `qlinear` and the fused decode
// step (decode.cpp) both call.
void loom::qlinear_raw(const float* xp, int64_t M, int64_t K, const uint8_t* wp, int64_t row_bytes, int qtype, int64_t N,
                       float* yp, bool int8) {
  if (qtype & loom::PANELS) return loom::panels_linear_raw(xp, M, K, wp, row_bytes, qtype & ~loom::PANELS, N, yp);
#if defined(LOOM_INT8_512) || defined(LOOM_INT8_256)
  if (int8) {
    switch (qtype) {
      case Q8_0: return int8_linear<Q8_0>(xp, M, K, wp, row_bytes, N, yp);
      case Q4_0: return int8_linear<Q4_0>(xp, M, K, wp, row_bytes, N, yp);
      case Q4_1: return int8_linear<Q4_1>(xp, M, K, wp, row_bytes, N, yp);
    }
  }
#endif
  const int bb = block_bytes(qtype);
#ifdef LOOM_QLINEAR_SCALAR
  at::parallel_for(0, N, grain(row_bytes), [&](int64_t n0, int64_t n1) {
    float w[QK];
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = 0.f;
      for (int64_t j = 0; j < K / QK; ++j) {
        dequant_block_scalar(wp + n * row_bytes + j * bb, qtype, w);
        for (int64_t m = 0; m < M; ++m) {
          float s = 0.f;
          for (int i = 0; i < QK; ++i) s += w[i] * xp[m * K + j * QK + i];
          yp[m * N + n] += s;
        }
      }
    }
  });
#else
  // Rows of x in groups of 8 (AVX-512 keeps 8 accumulators and the block's weights in registers;
  // AVX2's 16 registers fit 8 accumulators too), then 4, 2, 1 for the rest.
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) run_rows<8>(xp + m * K, K, wp, row_bytes, qtype, bb, N, yp + m * N);
  for (; m + 4 <= M; m += 4) run_rows<4>(xp + m * K, K, wp, row_bytes, qtype, bb, N, yp + m * N);
  for (; m + 2 <= M; m += 2) run_rows<2>(xp + m * K, K, wp, row_bytes, qtype, bb, N, yp + m * N);
  for (; m < M; ++m) run_rows<1>(xp + m * K, K, wp, row_bytes, qtype, bb, N, yp + m * N);
#endif
}

// y = x @ dequant(W)^T: x [M, K] float32 (contiguous), W [N, K / 32 * block bytes] uint8; `int8`: with
// x quantized to int8 blocks where the build has that path (int8_isa), else the float path.
torch::Tensor qlinear(torch::Tensor x, torch::Tensor W, int64_t qtype, bool int8) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(W.dtype() == torch::kUInt8 && W.dim() == 2 && W.is_contiguous(), "W must be a contiguous 2-D uint8 tensor");
  const int bb = block_bytes((int)qtype);
  TORCH_CHECK(bb > 0, "unsupported quantization type ", qtype);
  const int64_t M = x.size(0), K = x.size(1), N = W.size(0);
  TORCH_CHECK(K % QK == 0 && W.size(1) == K / QK * bb, "W holds ", W.size(1), " bytes a row; K = ", K, " needs ", K / QK * bb);
  auto y = torch::empty({M, N}, x.options());
  loom::qlinear_raw(x.data_ptr<float>(), M, K, W.data_ptr<uint8_t>(), W.size(1), (int)qtype, N, y.data_ptr<float>(), int8);
  return y;
}

// out[N, K] = dequant(W): float32 or bfloat16 (rounded to nearest even), rows split over torch's
// threads. For many rows of x (prefill) the layer dequantises a band of W at a time into `out`
// and multiplies it with the machine's GEMM, which beats the in-register kernel past ~16 rows.
void dequantize_into(torch::Tensor W, int64_t qtype, torch::Tensor out) {
  TORCH_CHECK(W.dtype() == torch::kUInt8 && W.dim() == 2 && W.is_contiguous(), "W must be a contiguous 2-D uint8 tensor");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == W.size(0), "out must be a contiguous [N, K] tensor");
  TORCH_CHECK(out.dtype() == torch::kFloat32 || out.dtype() == torch::kBFloat16, "out must be float32 or bfloat16");
  TORCH_CHECK(!(qtype & loom::PANELS), "dequantize_into reads GGUF's layout; panels are read back by panels.py");
  const int bb = block_bytes((int)qtype);
  TORCH_CHECK(bb > 0, "unsupported quantization type ", qtype);
  const int64_t N = W.size(0), K = out.size(1), nb = K / QK;
  TORCH_CHECK(K % QK == 0 && W.size(1) == nb * bb, "W holds ", W.size(1), " bytes a row; K = ", K, " needs ", nb * bb);
  const uint8_t* wp = W.data_ptr<uint8_t>();
  const bool bf16 = out.dtype() == torch::kBFloat16;
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  c10::BFloat16* ob = bf16 ? out.data_ptr<c10::BFloat16>() : nullptr;
  at::parallel_for(0, N, grain(W.size(1)), [&](int64_t n0, int64_t n1) {
    alignas(64) float w[QK];
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = wp + n * W.size(1) + b * bb;
        if (bf16) {
          dequant_block_scalar(blk, (int)qtype, w);
          c10::BFloat16* dst = ob + n * K + b * QK;
          for (int i = 0; i < QK; ++i) dst[i] = c10::BFloat16(w[i]);
        } else {
          dequant_block_scalar(blk, (int)qtype, of + n * K + b * QK);
        }
      }
    }
  });
}

std::string isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}

// The int8-activation path this build has: "avx512_vnni", "avx2", or "" (the float path only).
std::string int8_isa() {
#if defined(LOOM_INT8_512)
  return "avx512_vnni";
#elif defined(LOOM_INT8_256)
  return "avx2";
#else
  return "";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qlinear", &qlinear, "y = x @ dequant(W)^T for GGUF Q8_0 / Q4_0 / Q4_1 blocks", pybind11::arg("x"),
        pybind11::arg("W"), pybind11::arg("qtype"), pybind11::arg("int8") = false);
  m.def("int8_isa", &int8_isa, "the int8-activation path the kernel was built with, or ''");
  m.def("isa", &isa, "the instruction set the kernel was built for");
  m.def("panels_built", &loom::panels_built, "whether this build has the panel kernel (AVX512-VNNI)");
  m.def("dequantize_into", &dequantize_into, "out[N, K] = dequant(W), float32 or bfloat16");
  loom::register_decode(m);  // decode.cpp: the fused decode step
}
