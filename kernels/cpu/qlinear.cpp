// Weight-only quantized linear layers for the CPU: y[M, N] = x[M, K] @ W[N, K]^T, with W kept in
// GGUF's block formats (32 weights a block) and dequantised in registers, block by block, never
// into a float copy of W. Built for few rows (decode: M = 1 to 16), where a linear layer is bound
// by the bytes of W it reads: 1.06 bytes a weight for Q8_0, 0.56 for Q4_0, 0.63 for Q4_1, against
// 4 for fp32.
//
//   Q8_0: fp16 d, int8 q[32]           w = d * q
//   Q4_0: fp16 d, uint8 qs[16]         w = d * (nibble - 8); low nibbles are weights 0-15, high 16-31
//   Q4_1: fp16 d, fp16 m, uint8 qs[16] w = d * nibble + m
//
// Each block's 32 weights become two 16-float vectors (AVX-512) or four 8-float vectors (AVX2),
// which every row of x then multiplies: the dequantisation is paid once per block for all M rows.
// Output rows are split over torch's threads.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "qlinear.h"

int loom::block_bytes(int qtype) {
  switch (qtype) {
    case 8: return 2 + 32;   // Q8_0
    case 2: return 2 + 16;   // Q4_0
    case 3: return 4 + 16;   // Q4_1
  }
  return 0;
}

namespace {
using loom::block_bytes;

constexpr int QK = 32;
enum QType : int { Q8_0 = 8, Q4_0 = 2, Q4_1 = 3 };

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

}  // namespace

// y[M, N] = x[M, K] @ dequant(W)^T on raw pointers (qlinear.h): what `qlinear` and the fused decode
// step (decode.cpp) both call.
void loom::qlinear_raw(const float* xp, int64_t M, int64_t K, const uint8_t* wp, int64_t row_bytes, int qtype, int64_t N,
                       float* yp) {
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

// y = x @ dequant(W)^T: x [M, K] float32 (contiguous), W [N, K / 32 * block bytes] uint8.
torch::Tensor qlinear(torch::Tensor x, torch::Tensor W, int64_t qtype) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(W.dtype() == torch::kUInt8 && W.dim() == 2 && W.is_contiguous(), "W must be a contiguous 2-D uint8 tensor");
  const int bb = block_bytes((int)qtype);
  TORCH_CHECK(bb > 0, "unsupported quantization type ", qtype);
  const int64_t M = x.size(0), K = x.size(1), N = W.size(0);
  TORCH_CHECK(K % QK == 0 && W.size(1) == K / QK * bb, "W holds ", W.size(1), " bytes a row; K = ", K, " needs ", K / QK * bb);
  auto y = torch::empty({M, N}, x.options());
  loom::qlinear_raw(x.data_ptr<float>(), M, K, W.data_ptr<uint8_t>(), W.size(1), (int)qtype, N, y.data_ptr<float>());
  return y;
}

// out[N, K] = dequant(W): float32 or bfloat16 (rounded to nearest even), rows split over torch's
// threads. For many rows of x (prefill) the layer dequantises a band of W at a time into `out`
// and multiplies it with the machine's GEMM, which beats the in-register kernel past ~16 rows.
void dequantize_into(torch::Tensor W, int64_t qtype, torch::Tensor out) {
  TORCH_CHECK(W.dtype() == torch::kUInt8 && W.dim() == 2 && W.is_contiguous(), "W must be a contiguous 2-D uint8 tensor");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == W.size(0), "out must be a contiguous [N, K] tensor");
  TORCH_CHECK(out.dtype() == torch::kFloat32 || out.dtype() == torch::kBFloat16, "out must be float32 or bfloat16");
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qlinear", &qlinear, "y = x @ dequant(W)^T for GGUF Q8_0 / Q4_0 / Q4_1 blocks");
  m.def("isa", &isa, "the instruction set the kernel was built for");
  m.def("dequantize_into", &dequantize_into, "out[N, K] = dequant(W), float32 or bfloat16");
  loom::register_decode(m);  // decode.cpp: the fused decode step
}
