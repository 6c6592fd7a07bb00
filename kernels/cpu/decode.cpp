// The decode step of a Llama-family model on the CPU in one call: every decoder layer (RMSNorm with
// the residual add, the q/k/v projection, rotary, the KV store, attention over the paged KV cache,
// the output projection, RMSNorm, gate/up, SiLU * up, down) and the final norm, for a few rows.
//
// Why: at one row a decode step of a 135M model reads ~66 MB of Q4_1 weights (~4 ms on two cores),
// but the same step through torch ran ~50 small ops a layer, each a Python call and a dispatch of a
// few microseconds: ~7 ms of the 12 ms step. Here the layers' tensors are gathered once
// (`DecodeModel`, built by runtime/model_executor/cpu_decode.py, like a captured CUDA graph), and a
// step is one call with no tensor allocated per op.
//
// The arithmetic is the torch path's (runtime/models/llama.py): fp32 throughout; for a bf16 model,
// every value the torch path stores in bf16 is rounded to bf16 at the same point (`Rounding`), so
// both paths differ only by summation order. Linear layers are `qlinear_raw` (qlinear.cpp), split over
// torch's threads, with x quantized to int8 blocks where the model is built with int8 = true
// (LOOM_CPU_INT8_ACT=1); attention splits its (row, head) pairs over them when there is enough to split.
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "qlinear.h"

namespace {

// x rounded to the nearest bf16 (ties to even), as torch rounds a float stored in a bf16 tensor.
inline float round_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return x;  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  std::memcpy(&x, &u, 4);
  return x;
}

inline uint16_t bf16_bits(float x) {  // x already a bf16 value
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return (uint16_t)(u >> 16);
}

inline float from_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

struct Linear {
  torch::Tensor blocks;  // [N, K / 32 * block bytes] uint8
  int qtype;
  int64_t n, k;
};

struct Layer {
  torch::Tensor in_norm, post_norm;  // [hidden] fp32
  Linear qkv, o, gate_up, down;
  torch::Tensor k_cache, v_cache;  // [slots, Hkv, D], the model's dtype (fp32 or bf16)
};

class DecodeModel {
 public:
  DecodeModel(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps,
              double scale, bool bf16, torch::Tensor final_norm, torch::Tensor cos_sin, bool int8)
      : hidden_(hidden), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), inter_(intermediate), eps_((float)eps),
        scale_((float)scale), bf16_(bf16), int8_(int8), final_norm_(final_norm.contiguous()), cos_sin_(cos_sin.contiguous()) {
    TORCH_CHECK(heads % kv_heads == 0 && head_dim % 2 == 0, "heads must be a multiple of kv_heads, head_dim even");
    TORCH_CHECK(final_norm_.dtype() == torch::kFloat32 && final_norm_.numel() == hidden, "final norm: [hidden] fp32");
    TORCH_CHECK(cos_sin_.dtype() == torch::kFloat32 && cos_sin_.dim() == 2 && cos_sin_.size(1) == head_dim,
                "cos_sin: [positions, head_dim] fp32");
  }

  void add_layer(torch::Tensor in_norm, torch::Tensor qkv, int64_t qkv_type, torch::Tensor o, int64_t o_type,
                 torch::Tensor post_norm, torch::Tensor gate_up, int64_t gate_up_type, torch::Tensor down,
                 int64_t down_type, torch::Tensor k_cache, torch::Tensor v_cache) {
    const int64_t q_size = heads_ * head_dim_, kv_size = kv_heads_ * head_dim_;
    Layer l;
    l.in_norm = in_norm.contiguous();
    l.post_norm = post_norm.contiguous();
    TORCH_CHECK(l.in_norm.dtype() == torch::kFloat32 && l.in_norm.numel() == hidden_, "norm weights: [hidden] fp32");
    TORCH_CHECK(l.post_norm.dtype() == torch::kFloat32 && l.post_norm.numel() == hidden_, "norm weights: [hidden] fp32");
    l.qkv = linear(qkv, qkv_type, q_size + 2 * kv_size, hidden_, "qkv_proj");
    l.o = linear(o, o_type, hidden_, q_size, "o_proj");
    l.gate_up = linear(gate_up, gate_up_type, 2 * inter_, hidden_, "gate_up_proj");
    l.down = linear(down, down_type, hidden_, inter_, "down_proj");
    const auto kv_dtype = bf16_ ? torch::kBFloat16 : torch::kFloat32;
    for (const auto& c : {k_cache, v_cache}) {
      TORCH_CHECK(c.dtype() == kv_dtype && c.dim() == 3 && c.size(1) == kv_heads_ && c.size(2) == head_dim_ &&
                      c.is_contiguous(), "KV buffers: contiguous [slots, kv_heads, head_dim] in the model's dtype");
    }
    l.k_cache = k_cache;
    l.v_cache = v_cache;
    layers_.push_back(std::move(l));
  }

  // hidden [M, hidden] (the token embeddings, the model's dtype); positions, out_loc, rows, seq_lens [M] int64;
  // req_to_token [R, C] int64 (row `rows[m]` holds the slots of that request's tokens, this step's at
  // position seq_lens[m] - 1) -> the final norm's output [M, hidden] in the model's dtype. Writes this
  // step's K and V into the KV buffers at `out_loc`.
  torch::Tensor forward(torch::Tensor hidden, torch::Tensor positions, torch::Tensor out_loc, torch::Tensor req_to_token,
                        torch::Tensor rows, torch::Tensor seq_lens) {
    const int64_t M = hidden.size(0);
    TORCH_CHECK(hidden.dim() == 2 && hidden.size(1) == hidden_, "hidden: [M, hidden]");
    for (const auto& t : {positions, out_loc, rows, seq_lens})
      TORCH_CHECK(t.dtype() == torch::kInt64 && t.numel() == M && t.is_contiguous(), "positions, out_loc, rows, seq_lens: [M] int64");
    TORCH_CHECK(req_to_token.dtype() == torch::kInt64 && req_to_token.dim() == 2 && req_to_token.is_contiguous(),
                "req_to_token: [rows, context] int64");
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* loc = out_loc.data_ptr<int64_t>();
    const int64_t* row = rows.data_ptr<int64_t>();
    const int64_t* lens = seq_lens.data_ptr<int64_t>();
    const int64_t slots = layers_.empty() ? 0 : layers_[0].k_cache.size(0);
    for (int64_t m = 0; m < M; ++m) {
      TORCH_CHECK(pos[m] >= 0 && pos[m] < cos_sin_.size(0), "position ", pos[m], " is past the rotary table");
      TORCH_CHECK(loc[m] > 0 && loc[m] < slots, "KV slot ", loc[m], " is outside the pool");
      TORCH_CHECK(row[m] >= 0 && row[m] < req_to_token.size(0) && lens[m] >= 1 && lens[m] <= req_to_token.size(1),
                  "request row / length outside req_to_token");
    }

    const int64_t H = hidden_, q_size = heads_ * head_dim_, kv_size = kv_heads_ * head_dim_;
    const int64_t qkv_n = q_size + 2 * kv_size;
    auto opts = torch::TensorOptions().dtype(torch::kFloat32);
    torch::Tensor h = hidden.to(torch::kFloat32, false, true).contiguous();  // [M, H] layer output (a copy: never the caller's)
    torch::Tensor res = torch::empty({M, H}, opts);                      // residual stream
    torch::Tensor x = torch::empty({M, H}, opts);                        // normed input of a projection
    torch::Tensor qkv = torch::empty({M, qkv_n}, opts);
    torch::Tensor attn = torch::empty({M, q_size}, opts);
    torch::Tensor gu = torch::empty({M, 2 * inter_}, opts);
    torch::Tensor act = torch::empty({M, inter_}, opts);
    float *hp = h.data_ptr<float>(), *rp = res.data_ptr<float>(), *xp = x.data_ptr<float>();
    float *qkvp = qkv.data_ptr<float>(), *ap = attn.data_ptr<float>(), *gp = gu.data_ptr<float>(), *actp = act.data_ptr<float>();

    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      add_norm(hp, rp, i == 0, l.in_norm.data_ptr<float>(), xp, M);
      run(l.qkv, xp, M, qkvp);
      rotate_and_store(l, qkvp, M, pos, loc);
      attend(l, qkvp, M, row, lens, req_to_token.data_ptr<int64_t>(), req_to_token.size(1), ap);
      run(l.o, ap, M, hp);
      add_norm(hp, rp, false, l.post_norm.data_ptr<float>(), xp, M);
      run(l.gate_up, xp, M, gp);
      for (int64_t m = 0; m < M; ++m) {
        const float* g = gp + m * 2 * inter_;
        const float* u = g + inter_;
        float* a = actp + m * inter_;
        for (int64_t j = 0; j < inter_; ++j) a[j] = r(r(g[j] / (1.f + std::exp(-g[j]))) * u[j]);
      }
      run(l.down, actp, M, hp);
    }
    add_norm(hp, rp, layers_.empty(), final_norm_.data_ptr<float>(), xp, M);
    return bf16_ ? x.to(torch::kBFloat16) : x;
  }

 private:
  int64_t hidden_, heads_, kv_heads_, head_dim_, inter_;
  float eps_, scale_;
  bool bf16_;
  bool int8_;  // linear layers with int8 activations (qlinear_raw)
  torch::Tensor final_norm_, cos_sin_;
  std::vector<Layer> layers_;

  // A value as the torch path keeps it: itself in fp32, rounded to bf16 in a bf16 model.
  inline float r(float v) const { return bf16_ ? round_bf16(v) : v; }

  static Linear linear(const torch::Tensor& blocks, int64_t qtype, int64_t n, int64_t k, const char* what) {
    const int bb = loom::block_bytes((int)qtype);
    TORCH_CHECK(bb > 0, what, ": unsupported quantization type ", qtype);
    TORCH_CHECK(blocks.dtype() == torch::kUInt8 && blocks.dim() == 2 && blocks.is_contiguous() && blocks.size(0) == n &&
                    k % 32 == 0 && blocks.size(1) == k / 32 * bb, what, ": blocks must be [", n, ", ", k / 32 * bb, "] uint8");
    return Linear{blocks, (int)qtype, n, k};
  }

  // y[M, N] = x[M, K] @ W^T, each output rounded as the torch path stores it.
  void run(const Linear& w, const float* x, int64_t M, float* y) const {
    loom::qlinear_raw(x, M, w.k, w.blocks.data_ptr<uint8_t>(), w.blocks.size(1), w.qtype, w.n, y, int8_);
    if (bf16_)
      for (int64_t i = 0; i < M * w.n; ++i) y[i] = round_bf16(y[i]);
  }

  // res = h (first) or h + res; out = rmsnorm(res) * w (llama.py's fused residual add and norm).
  void add_norm(const float* h, float* res, bool first, const float* w, float* out, int64_t M) const {
    const int64_t H = hidden_;
    for (int64_t m = 0; m < M; ++m) {
      float* rr = res + m * H;
      const float* hh = h + m * H;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < H; ++j) {
        const float v = first ? hh[j] : r(hh[j] + rr[j]);
        rr[j] = v;
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / (float)H + eps_);
      float* o = out + m * H;
      if (bf16_) {  // RMSNorm._norm: weight * (x * rsqrt(...)).to(bf16), in bf16
        for (int64_t j = 0; j < H; ++j) o[j] = round_bf16(w[j] * round_bf16(rr[j] * inv));
      } else {  // F.rms_norm: x * rsqrt(...) * weight
        for (int64_t j = 0; j < H; ++j) o[j] = rr[j] * inv * w[j];
      }
    }
  }

  // Rotary (neox: halves) over the q and k heads of each row, then k and v into the KV buffers.
  void rotate_and_store(const Layer& l, float* qkv, int64_t M, const int64_t* pos, const int64_t* loc) const {
    const int64_t D = head_dim_, half = D / 2, q_size = heads_ * D, kv_size = kv_heads_ * D;
    const int64_t qkv_n = q_size + 2 * kv_size;
    const float* table = cos_sin_.data_ptr<float>();
    std::vector<float> cs(D);
    for (int64_t m = 0; m < M; ++m) {
      const float* t = table + pos[m] * D;  // [cos | sin], fp32; cast to the model's dtype first
      for (int64_t j = 0; j < D; ++j) cs[j] = r(t[j]);
      float* row = qkv + m * qkv_n;
      for (int64_t hd = 0; hd < heads_ + kv_heads_; ++hd) {
        float* x1 = row + hd * D;
        float* x2 = x1 + half;
        for (int64_t j = 0; j < half; ++j) {
          const float c = cs[j], s = cs[half + j], a = x1[j], b = x2[j];
          x1[j] = r(r(a * c) - r(b * s));
          x2[j] = r(r(b * c) + r(a * s));
        }
      }
      const float* k = row + q_size;
      const float* v = k + kv_size;
      if (bf16_) {
        auto* kc = reinterpret_cast<uint16_t*>(l.k_cache.data_ptr<at::BFloat16>()) + loc[m] * kv_size;
        auto* vc = reinterpret_cast<uint16_t*>(l.v_cache.data_ptr<at::BFloat16>()) + loc[m] * kv_size;
        for (int64_t j = 0; j < kv_size; ++j) {
          kc[j] = bf16_bits(k[j]);
          vc[j] = bf16_bits(v[j]);
        }
      } else {
        std::memcpy(l.k_cache.data_ptr<float>() + loc[m] * kv_size, k, kv_size * sizeof(float));
        std::memcpy(l.v_cache.data_ptr<float>() + loc[m] * kv_size, v, kv_size * sizeof(float));
      }
    }
  }

  // Each row's query heads over its own tokens' K and V (slots req_to_token[rows[m], 0 : seq_lens[m]]):
  // softmax(q k^T * scale) v, exact, one (row, head) pair per task.
  void attend(const Layer& l, const float* qkv, int64_t M, const int64_t* row, const int64_t* lens,
              const int64_t* req_to_token, int64_t ctx, float* out) const {
    const int64_t D = head_dim_, q_size = heads_ * D, kv_size = kv_heads_ * D, qkv_n = q_size + 2 * kv_size;
    const int64_t group = heads_ / kv_heads_;
    int64_t work = 0;
    for (int64_t m = 0; m < M; ++m) work += lens[m] * heads_ * D;
    const int64_t tasks = M * heads_;
    // Below ~64k multiply-adds a thread team costs more than it saves.
    const int64_t grain = work < (1 << 16) ? tasks : 1;
    const bool bf16 = bf16_;
    const void* kbase = l.k_cache.data_ptr();
    const void* vbase = l.v_cache.data_ptr();
    at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
      std::vector<float> p, k32(D), acc(D);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m = t / heads_, hd = t % heads_, g = hd / group;
        const int64_t L = lens[m];
        const int64_t* slots = req_to_token + row[m] * ctx;
        const float* q = qkv + m * qkv_n + hd * D;
        p.resize(L);
        float mx = -INFINITY;
        for (int64_t j = 0; j < L; ++j) {
          const int64_t off = slots[j] * kv_size + g * D;
          float s = 0.f;
          if (bf16) {
            const uint16_t* k = static_cast<const uint16_t*>(kbase) + off;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) s += q[d] * from_bf16(k[d]);
          } else {
            const float* k = static_cast<const float*>(kbase) + off;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) s += q[d] * k[d];
          }
          s *= scale_;
          p[j] = s;
          mx = s > mx ? s : mx;
        }
        // As torch's CPU flash attention: the sum of the exponentials in fp32, the weights of V rounded
        // to the model's dtype (in bf16 the product with V is a bf16 GEMM there).
        float denom = 0.f;
        for (int64_t j = 0; j < L; ++j) {
          const float e = std::exp(p[j] - mx);
          denom += e;
          p[j] = r(e);
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < L; ++j) {
          const int64_t off = slots[j] * kv_size + g * D;
          const float w = p[j];
          if (bf16) {
            const uint16_t* v = static_cast<const uint16_t*>(vbase) + off;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) acc[d] += w * from_bf16(v[d]);
          } else {
            const float* v = static_cast<const float*>(vbase) + off;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) acc[d] += w * v[d];
          }
        }
        float* o = out + m * q_size + hd * D;
        const float inv = 1.f / denom;
        for (int64_t d = 0; d < D; ++d) o[d] = r(acc[d] * inv);
      }
    });
  }
};

}  // namespace

void loom::register_decode(pybind11::module_& m) {
  pybind11::class_<DecodeModel>(m, "DecodeModel", "A Llama-family decode step in one call (decode.cpp)")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, bool, torch::Tensor, torch::Tensor, bool>(),
           pybind11::arg("hidden"), pybind11::arg("heads"), pybind11::arg("kv_heads"), pybind11::arg("head_dim"),
           pybind11::arg("intermediate"), pybind11::arg("eps"), pybind11::arg("scale"), pybind11::arg("bf16"),
           pybind11::arg("final_norm"), pybind11::arg("cos_sin"), pybind11::arg("int8") = false)
      .def("add_layer", &DecodeModel::add_layer)
      .def("forward", &DecodeModel::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
