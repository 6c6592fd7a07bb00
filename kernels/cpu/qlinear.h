// What qlinear.cpp shares with the fused decode step (decode.cpp): both are built into one extension.
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace loom {

// `qtype | PANELS`: the blocks are laid out in panels of 16 output rows (panels.cpp, panels.py).
constexpr int PANELS = 0x100;

constexpr int QK = 32;  // weights a block
enum QType : int { Q8_0 = 8, Q4_0 = 2, Q4_1 = 3 };  // GGUF's type ids of the block formats read here

// Bytes of one 32-weight block of GGUF type `qtype` (8 = Q8_0, 2 = Q4_0, 3 = Q4_1; with or without
// PANELS); 0 for any other.
constexpr int block_bytes(int qtype) {
  switch (qtype & ~PANELS) {
    case Q8_0: return 2 + 32;  // fp16 d, int8 q[32]
    case Q4_0: return 2 + 16;  // fp16 d, 32 nibbles
    case Q4_1: return 4 + 16;  // fp16 d and m, 32 nibbles
  }
  return 0;
}

// y[M, N] = x[M, K] @ dequant(W)^T, W [N, row_bytes] in `qtype` blocks; output rows split over torch's threads.
// `int8`: x quantized to int8 32-blocks and integer dot products (~1e-2 relative error, several times
// fewer instructions) where the build has that path; otherwise, and when false, the exact float path.
void qlinear_raw(const float* x, int64_t M, int64_t K, const uint8_t* W, int64_t row_bytes, int qtype, int64_t N, float* y,
                 bool int8);

// Whether this build has the panel kernel (AVX512-VNNI), and y = x @ dequant(W)^T for W in panels
// (always int8 activations; N % 16 == 0).
bool panels_built();
void panels_linear_raw(const float* x, int64_t M, int64_t K, const uint8_t* W, int64_t row_bytes, int qtype, int64_t N,
                       float* y);

// Adds the DecodeModel class (decode.cpp) to the extension's module.
void register_decode(pybind11::module_& m);

}  // namespace loom
