// Quantized linear layers in panels: GGUF's Q8_0 / Q4_0 / Q4_1 blocks laid out again at load (kernels/cpu/panels.py)
// so that AVX512-VNNI multiplies 16 output rows at once, with x in int8 32-blocks as llama.cpp quantizes it.
//
// A panel is 16 output rows. For each 32-weight block j of a panel, in order:
//   Q4_0 / Q4_1: 4 vectors of 64 bytes; byte 4 n + i of vector t is byte 4 t + i of row n's block (its
//                low nibble is weight 4 t + i, its high nibble weight 16 + 4 t + i); then the 16 rows' d
//                (fp16), then (Q4_1) their m (fp16);
//   Q8_0:        8 vectors of 64 bytes; byte 4 n + i of vector t is weight 4 t + i of row n, plus 128
//                (vpdpbusd multiplies unsigned by signed); then the 16 rows' d (fp16).
// A panel block takes 16 x GGUF's block bytes, so a layer keeps its [N, row bytes] shape and its size.
//
// One vpdpbusd then multiplies 4 weights of 16 rows by 4 quants of one row of x (broadcast), with no
// horizontal sums. A block's integer dot products meet its scales once: y += d_w * d_x * dot + c_w *
// d_x * sum(q_x), where the weight is d_w * u + c_w (Q4_0: c = -8 d, Q4_1: c = m, Q8_0: c = -128 d).
// A tile is 4 rows of x by 2 panels (32 outputs): 8 accumulators of int32 and 8 of fp32 in registers.
// The previous kernel (qlinear.cpp) reads GGUF's own layout a row at a time, with a horizontal sum
// and a permute per 128 weights and row of x; this one does about twice the multiply-adds a second.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#include <immintrin.h>

#include "qlinear.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define LOOM_PANELS 1
#endif

namespace {
using loom::block_bytes;
using loom::Q4_0;
using loom::Q4_1;
using loom::Q8_0;
using loom::QK;
constexpr int PN = 16;  // output rows a panel

#ifdef LOOM_PANELS
// The rows of x in int8 32-blocks, in order: d = max|x| / 127, q = round(x / d) half away from zero
// (llama.cpp's q8_1), and d * sum(q) per block.
struct PlainRows {
  int64_t nb = 0, K = 0;
  std::vector<int8_t> q;  // [M, K]
  std::vector<float> d;   // [M, nb]
  std::vector<float> s;   // [M, nb]

  void quantize(const float* x, int64_t M, int64_t k) {
    K = k;
    nb = K / QK;
    q.resize(M * K);
    d.resize(M * nb);
    s.resize(M * nb);
    at::parallel_for(0, M * nb, 4096, [&](int64_t r0, int64_t r1) { quantize_blocks(x, r0, r1); });
  }

  void quantize_blocks(const float* x, int64_t r0, int64_t r1) {
    const __m512 sign = _mm512_set1_ps(-0.f), half = _mm512_set1_ps(0.5f);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xb = x + r * QK;
      const __m512 a = _mm512_loadu_ps(xb), b = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, a), _mm512_andnot_ps(sign, b)));
      const float dj = amax / 127.f;
      const __m512 id = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      auto round = [&](__m512 v) {
        v = _mm512_mul_ps(v, id);
        return _mm512_cvttps_epi32(_mm512_add_ps(v, _mm512_or_ps(half, _mm512_and_ps(sign, v))));
      };
      const __m512i qa = round(a), qb = round(b);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q.data() + r * QK), _mm512_cvtepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q.data() + r * QK + 16), _mm512_cvtepi32_epi8(qb));
      d[r] = dj;
      s[r] = dj * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    }
  }
};

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline __m512 half16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// Rows [m0, m0 + MT) of x against blocks [j0, j1) of panels [p0, p0 + NT): y[m, 16 p + n], or y += that (`add`).
template <int QT, int MT, int NT>
inline void tile(const PlainRows& a, int64_t m0, const uint8_t* W, int64_t panel_bytes, int64_t p0, int64_t j0, int64_t j1,
                 bool add, float* y, int64_t N) {
  constexpr int bb = block_bytes(QT);
  constexpr int wbytes = QT == Q8_0 ? 512 : 256;
  const int64_t nb = a.nb;
  const int8_t* xq[MT];
  const float* dx[MT];
  const float* sx[MT];
  for (int m = 0; m < MT; ++m) {
    xq[m] = a.q.data() + (m0 + m) * a.K;
    dx[m] = a.d.data() + (m0 + m) * nb;
    sx[m] = a.s.data() + (m0 + m) * nb;
  }
  __m512 f[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int t = 0; t < NT; ++t) f[m][t] = add ? _mm512_loadu_ps(y + (m0 + m) * N + (p0 + t) * PN) : _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* wb[NT];
    for (int t = 0; t < NT; ++t) wb[t] = W + (p0 + t) * panel_bytes + j * (PN * bb);
    __m512i acc[MT][NT];
    for (int m = 0; m < MT; ++m)
      for (int t = 0; t < NT; ++t) acc[m][t] = _mm512_setzero_si512();
    if constexpr (QT == Q8_0) {
      for (int v = 0; v < 8; ++v) {
        __m512i w[NT];
        for (int t = 0; t < NT; ++t) w[t] = _mm512_loadu_si512(wb[t] + 64 * v);
        for (int m = 0; m < MT; ++m) {
          const __m512i xb = _mm512_set1_epi32(load_i32(xq[m] + j * QK + 4 * v));
          for (int t = 0; t < NT; ++t) acc[m][t] = _mm512_dpbusd_epi32(acc[m][t], w[t], xb);
        }
      }
    } else {
      for (int v = 0; v < 4; ++v) {
        __m512i lo[NT], hi[NT];
        for (int t = 0; t < NT; ++t) {
          const __m512i z = _mm512_loadu_si512(wb[t] + 64 * v);
          lo[t] = _mm512_and_si512(z, low);
          hi[t] = _mm512_and_si512(_mm512_srli_epi16(z, 4), low);
        }
        for (int m = 0; m < MT; ++m) {
          const __m512i xl = _mm512_set1_epi32(load_i32(xq[m] + j * QK + 4 * v));
          const __m512i xh = _mm512_set1_epi32(load_i32(xq[m] + j * QK + 16 + 4 * v));
          for (int t = 0; t < NT; ++t) acc[m][t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[m][t], lo[t], xl), hi[t], xh);
        }
      }
    }
    for (int t = 0; t < NT; ++t) {
      const __m512 dw = half16(wb[t] + wbytes);
      const __m512 cw = QT == Q4_1 ? half16(wb[t] + wbytes + 32) : _mm512_mul_ps(dw, _mm512_set1_ps(QT == Q4_0 ? -8.f : -128.f));
      for (int m = 0; m < MT; ++m) {
        f[m][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][t]), _mm512_mul_ps(dw, _mm512_set1_ps(dx[m][j])), f[m][t]);
        f[m][t] = _mm512_fmadd_ps(cw, _mm512_set1_ps(sx[m][j]), f[m][t]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int t = 0; t < NT; ++t) _mm512_storeu_ps(y + (m0 + m) * N + (p0 + t) * PN, f[m][t]);
}

// Every row of x against panels [p0, p0 + NT), 4 rows at a time, in chunks of K whose weights stay
// in L1 (16 KiB a chunk: a down projection's 1536 inputs ran at 2/3 the speed of 576 in one chunk).
template <int QT, int NT>
void panel_rows(const PlainRows& a, int64_t M, const uint8_t* W, int64_t panel_bytes, int64_t p0, float* y, int64_t N) {
  constexpr int64_t most = (16 << 10) / (NT * PN * block_bytes(QT));
  const int64_t chunks = (a.nb + most - 1) / most, per = (a.nb + chunks - 1) / chunks;
  for (int64_t j0 = 0; j0 < a.nb; j0 += per) {
    const int64_t j1 = std::min(a.nb, j0 + per);
    const bool add = j0 > 0;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) tile<QT, 4, NT>(a, m, W, panel_bytes, p0, j0, j1, add, y, N);
    switch (M - m) {
      case 3: tile<QT, 3, NT>(a, m, W, panel_bytes, p0, j0, j1, add, y, N); break;
      case 2: tile<QT, 2, NT>(a, m, W, panel_bytes, p0, j0, j1, add, y, N); break;
      case 1: tile<QT, 1, NT>(a, m, W, panel_bytes, p0, j0, j1, add, y, N); break;
    }
  }
}

template <int QT>
void panel_linear(const float* x, int64_t M, int64_t K, const uint8_t* W, int64_t row_bytes, int64_t N, float* y) {
  thread_local PlainRows rows;  // reused: a decode step quantizes ~4 activations a layer
  rows.quantize(x, M, K);
  const PlainRows& a = rows;  // a lambda names a thread_local, not captures it: the workers need this thread's
  const int64_t panels = N / PN, pairs = (panels + 1) / 2, panel_bytes = PN * row_bytes;
  // At least 64 KiB of weights a thread at one row (waking a thread costs microseconds), less with more rows.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (2 * panel_bytes * std::max<int64_t>(M, 1)));
  at::parallel_for(0, pairs, grain, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      if (2 * q + 1 < panels)
        panel_rows<QT, 2>(a, M, W, panel_bytes, 2 * q, y, N);
      else
        panel_rows<QT, 1>(a, M, W, panel_bytes, 2 * q, y, N);
    }
  });
}
#endif  // LOOM_PANELS
}  // namespace

bool loom::panels_built() {
#ifdef LOOM_PANELS
  return true;
#else
  return false;
#endif
}

void loom::panels_linear_raw(const float* x, int64_t M, int64_t K, const uint8_t* W, int64_t row_bytes, int qtype, int64_t N,
                             float* y) {
#ifdef LOOM_PANELS
  TORCH_CHECK(N % PN == 0 && K % QK == 0, "panels need N % 16 == 0 and K % 32 == 0, got N = ", N, ", K = ", K);
  switch (qtype) {
    case Q8_0: return panel_linear<Q8_0>(x, M, K, W, row_bytes, N, y);
    case Q4_0: return panel_linear<Q4_0>(x, M, K, W, row_bytes, N, y);
    case Q4_1: return panel_linear<Q4_1>(x, M, K, W, row_bytes, N, y);
  }
  TORCH_CHECK(false, "unsupported quantization type ", qtype);
#else
  (void)x, (void)M, (void)K, (void)W, (void)row_bytes, (void)qtype, (void)N, (void)y;
  TORCH_CHECK(false, "this build has no panel kernel (it needs AVX512-VNNI)");
#endif
}
