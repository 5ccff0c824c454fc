// Dynamic causal conv decode update on the CPU, in place in a pool of conv states.
//
// `jetnemotron::dynamic_conv_update` runs one decode step (one token per sequence) or one
// speculative-decoding step (a few tokens per sequence) of
//
//     out_t[d] = silu( sum_{w < W} kernels_t[d, w] * in_{t - W + 1 + w}[d] )
//
// where `in` is the sequence's conv history followed by this step's inputs. Sequence i
// reads its history from rows `h .. h + W - 2` of `state_pool[state_indices[i]]` (h = 0,
// or `num_accepted_tokens[i] - 1` when given) and afterwards row r of that buffer holds
// `in[r + 1]`: the W - 1 inputs ending at each of its tokens, for whichever the next step
// accepts (vLLM's conv-state convention). A negative slot (vLLM's PAD_SLOT_ID) reads a
// zero history and is never written. Products and the sum are float32, in tap order;
// the history is rounded to x's dtype first, as the PyTorch definition does.
//
// Built on first use by torch.utils.cpp_extension (kernels/dynamic_conv/cpu.py).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>

namespace {

constexpr int64_t kBlockD = 64;     // channels per work item
constexpr int64_t kMaxInputs = 64;  // W - 1 + tokens of one sequence

// Conversions written on the bits, so that the channel loops vectorize.
inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float to_float(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename T>
inline T from_float(float f) { return static_cast<T>(f); }
template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float f) {  // round to nearest even, NaN kept quiet
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(f != f ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// exp(x) for the SiLU, branch-free so that the channel loop vectorizes (libm's expf does
// not without -ffast-math): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its degree-6 Taylor
// polynomial (relative error below 1.2e-7, about one float32 ulp), times 2^n from the bits.
inline float exp_vectorizable(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float r = x - n * 0.693145752f - n * 1.42860677e-6f;  // ln2 split in two for accuracy
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t scale_bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return p * scale;
}

struct Geometry {
  int64_t num_seqs, D, W, rows;       // rows: history buffer length of one slot
  int64_t x_row, pool_slot, pool_row, pool_d;
};

template <typename T, typename P, int W, bool kUnitChannelStride>
void update_block(const T* x, const T* kernels, P* pool, T* out, const Geometry& g,
                  int64_t slot, int64_t start, int64_t len, int64_t history, int64_t d0,
                  int64_t d1) {
  const int64_t num_in = W - 1 + len;
  const int64_t pool_d = kUnitChannelStride ? 1 : g.pool_d;  // a constant lets the loops vectorize
  float in[kMaxInputs][kBlockD];
  const int64_t n = d1 - d0;
  const P* rows = slot >= 0 ? pool + slot * g.pool_slot + history * g.pool_row : nullptr;
  for (int64_t j = 0; j < W - 1; ++j) {
    for (int64_t c = 0; c < n; ++c) {
      in[j][c] = rows ? to_float(from_float<T>(to_float(rows[j * g.pool_row + (d0 + c) * pool_d]))) : 0.0f;
    }
  }
  for (int64_t t = 0; t < len; ++t) {
    const T* xt = x + (start + t) * g.x_row + d0;
    for (int64_t c = 0; c < n; ++c) in[W - 1 + t][c] = to_float(xt[c]);
  }
  for (int64_t t = 0; t < len; ++t) {
    const T* kt = kernels + ((start + t) * g.D + d0) * W;  // [n, W], tap fastest
    float taps[W][kBlockD];  // [n, W] -> [W, n], float32
    for (int w = 0; w < W; ++w) {
      for (int64_t c = 0; c < n; ++c) taps[w][c] = to_float(kt[c * W + w]);
    }
    float acc[kBlockD];
    for (int64_t c = 0; c < n; ++c) acc[c] = taps[0][c] * in[t][c];
    for (int w = 1; w < W; ++w) {
      for (int64_t c = 0; c < n; ++c) acc[c] += taps[w][c] * in[t + w][c];
    }
    T* ot = out + (start + t) * g.D + d0;
    for (int64_t c = 0; c < n; ++c) acc[c] = acc[c] / (1.0f + exp_vectorizable(-acc[c]));  // SiLU
    for (int64_t c = 0; c < n; ++c) ot[c] = from_float<T>(acc[c]);
  }
  if (slot < 0) return;
  P* dst = pool + slot * g.pool_slot;
  for (int64_t r = 0; r + 1 < num_in; ++r) {
    for (int64_t c = 0; c < n; ++c) dst[r * g.pool_row + (d0 + c) * pool_d] = from_float<P>(in[r + 1][c]);
  }
}

template <typename T, typename P, int W>
void update(const at::Tensor& x, const at::Tensor& kernels, at::Tensor& pool, at::Tensor& out,
            const Geometry& g, const int64_t* slots, const int64_t* starts, const int64_t* accepted) {
  const T* xp = x.data_ptr<T>();
  const T* kp = kernels.data_ptr<T>();
  P* pp = pool.data_ptr<P>();
  T* op = out.data_ptr<T>();
  const int64_t blocks = (g.D + kBlockD - 1) / kBlockD;
  // Work items (sequence, channel block) touch disjoint pool entries: slots are distinct.
  at::parallel_for(0, g.num_seqs * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / blocks, d0 = (item % blocks) * kBlockD;
      const int64_t start = starts ? starts[i] : i;
      const int64_t len = starts ? starts[i + 1] - starts[i] : 1;
      const int64_t history = accepted ? accepted[i] - 1 : 0;
      const int64_t d1 = std::min(d0 + kBlockD, g.D);
      if (g.pool_d == 1) {
        update_block<T, P, W, true>(xp, kp, pp, op, g, slots[i], start, len, history, d0, d1);
      } else {
        update_block<T, P, W, false>(xp, kp, pp, op, g, slots[i], start, len, history, d0, d1);
      }
    }
  });
}

template <typename T, typename P>
void update_for_width(const at::Tensor& x, const at::Tensor& kernels, at::Tensor& pool,
                      at::Tensor& out, const Geometry& g, const int64_t* slots,
                      const int64_t* starts, const int64_t* accepted) {
  switch (g.W) {
    case 2: return update<T, P, 2>(x, kernels, pool, out, g, slots, starts, accepted);
    case 3: return update<T, P, 3>(x, kernels, pool, out, g, slots, starts, accepted);
    case 4: return update<T, P, 4>(x, kernels, pool, out, g, slots, starts, accepted);
    case 5: return update<T, P, 5>(x, kernels, pool, out, g, slots, starts, accepted);
    case 6: return update<T, P, 6>(x, kernels, pool, out, g, slots, starts, accepted);
    case 7: return update<T, P, 7>(x, kernels, pool, out, g, slots, starts, accepted);
    case 8: return update<T, P, 8>(x, kernels, pool, out, g, slots, starts, accepted);
    default: TORCH_CHECK(false, "dynamic_conv_update: conv size W must be in 2..8, got ", g.W);
  }
}

at::Tensor as_long(const at::Tensor& t) { return t.to(at::kLong).contiguous(); }

void dynamic_conv_update(const at::Tensor& x, const at::Tensor& kernels, at::Tensor& state_pool,
                         const at::Tensor& state_indices,
                         const std::optional<at::Tensor>& query_start_loc,
                         const std::optional<at::Tensor>& num_accepted_tokens, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "dynamic_conv_update: x must be [T, D] with unit channel stride");
  const int64_t T = x.size(0), D = x.size(1);
  TORCH_CHECK(kernels.dim() == 3 && kernels.size(0) == T && kernels.size(1) == D && kernels.is_contiguous(),
              "dynamic_conv_update: kernels must be contiguous [T, D, W] matching x [", T, ", ", D, "]");
  TORCH_CHECK(out.sizes() == x.sizes() && out.is_contiguous() && out.scalar_type() == x.scalar_type() &&
                  kernels.scalar_type() == x.scalar_type(),
              "dynamic_conv_update: out and kernels must have x's dtype; out contiguous [T, D]");
  const int64_t W = kernels.size(2);
  TORCH_CHECK(state_pool.dim() == 3 && state_pool.size(2) == D && state_pool.size(1) >= W - 1,
              "dynamic_conv_update: state_pool must be [num_slots, >= W - 1, D]");
  const at::Tensor slots = as_long(state_indices);
  const int64_t N = slots.numel();
  at::Tensor starts, accepted;
  int64_t max_len = 1;
  if (query_start_loc.has_value()) {
    starts = as_long(*query_start_loc);
    TORCH_CHECK(starts.numel() == N + 1, "dynamic_conv_update: query_start_loc must be [N + 1]");
    const int64_t* s = starts.data_ptr<int64_t>();
    TORCH_CHECK(s[N] <= T, "dynamic_conv_update: query_start_loc ends past the ", T, " tokens");
    for (int64_t i = 0; i < N; ++i) max_len = std::max(max_len, s[i + 1] - s[i]);
  } else {
    TORCH_CHECK(N <= T, "dynamic_conv_update: more sequences than tokens");
  }
  if (num_accepted_tokens.has_value()) {
    accepted = as_long(*num_accepted_tokens);
    TORCH_CHECK(accepted.numel() == N, "dynamic_conv_update: num_accepted_tokens must be [N]");
    const int64_t* a = accepted.data_ptr<int64_t>();
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK(a[i] >= 1 && a[i] - 1 + W - 1 <= state_pool.size(1),
                  "dynamic_conv_update: num_accepted_tokens out of the history buffer's range");
    }
  }
  TORCH_CHECK(W - 2 + max_len <= state_pool.size(1) && W - 1 + max_len <= kMaxInputs,
              "dynamic_conv_update: a sequence of ", max_len, " tokens does not fit a history buffer of ",
              state_pool.size(1), " rows");
  Geometry g{N, D, W, state_pool.size(1), x.stride(0), state_pool.stride(0), state_pool.stride(1),
             state_pool.stride(2)};
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* qp = starts.defined() ? starts.data_ptr<int64_t>() : nullptr;
  const int64_t* ap = accepted.defined() ? accepted.data_ptr<int64_t>() : nullptr;
  const auto pool_type = state_pool.scalar_type();
  const auto dispatch_pool = [&](auto activation) {
    using T = decltype(activation);
    if (pool_type == x.scalar_type()) {
      update_for_width<T, T>(x, kernels, state_pool, out, g, sp, qp, ap);
    } else {
      TORCH_CHECK(pool_type == at::kFloat, "dynamic_conv_update: state_pool must have x's dtype or float32");
      update_for_width<T, float>(x, kernels, state_pool, out, g, sp, qp, ap);
    }
  };
  switch (x.scalar_type()) {
    case at::kFloat: return dispatch_pool(float{});
    case at::kBFloat16: return dispatch_pool(c10::BFloat16{});
    case at::kHalf: return dispatch_pool(c10::Half{});
    default: TORCH_CHECK(false, "dynamic_conv_update: x must be float32, bfloat16 or float16");
  }
}

}  // namespace

TORCH_LIBRARY(jetnemotron, m) {
  m.def("dynamic_conv_update(Tensor x, Tensor kernels, Tensor(a!) state_pool, Tensor state_indices, "
        "Tensor? query_start_loc, Tensor? num_accepted_tokens, Tensor(b!) out) -> ()");
}

TORCH_LIBRARY_IMPL(jetnemotron, CPU, m) { m.impl("dynamic_conv_update", &dynamic_conv_update); }
