// Grouped expert MLP on CPU (docs/design.md §2.1): y[t] = Σ_kept w[t,j] · Expert_e(x[t]).
//
// The kept (token, choice) pairs are counting-sorted by expert once (stable in pair order); each
// expert's rows are one contiguous slice of a [M, ·] buffer (M = kept pairs: no padded E × C
// buffer). Per expert: fc1 as addmm with the bias (ATen / BLAS), the GELU (ATen's vectorised
// kernel) on the cache-warm [n_e, h] slice, fc2 as addmm. The gather of x, the combine over the
// k choices (weights applied there, per token, no atomics) and in the backward the weighted
// gather of dy, the routing-weight gradient and the sum of the k choices' dx run as parallel
// loops over tokens. The backward saves only the hidden pre-activation and the expert outputs;
// it recomputes the GELU per expert.
#include <algorithm>
#include <tuple>
#include <vector>

#include "m2mkd.h"

namespace m2mkd {
namespace {

struct PairSort {
  std::vector<int64_t> order;    // [M] pair ids (t·k + j) of the kept pairs, sorted by expert
  std::vector<int64_t> offsets;  // [E + 1]
  std::vector<int64_t> pos;      // [T·k] position in `order`, −1 when dropped
};

PairSort sort_pairs(const at::Tensor& expert, const at::Tensor& slot, int64_t E) {
  const int64_t N = expert.numel();
  const int64_t* ex = expert.data_ptr<int64_t>();
  const int64_t* sl = slot.data_ptr<int64_t>();
  PairSort s;
  s.offsets.assign(E + 1, 0);
  for (int64_t i = 0; i < N; ++i) {
    if (sl[i] < 0) continue;
    TORCH_CHECK(ex[i] >= 0 && ex[i] < E, "moe_mlp: expert index ", ex[i], " out of range [0, ", E, ")");
    s.offsets[ex[i] + 1]++;
  }
  for (int64_t e = 0; e < E; ++e) s.offsets[e + 1] += s.offsets[e];
  s.order.resize(s.offsets[E]);
  s.pos.assign(N, -1);
  std::vector<int64_t> fill(s.offsets.begin(), s.offsets.end() - 1);
  for (int64_t i = 0; i < N; ++i) {
    if (sl[i] < 0) continue;
    const int64_t p = fill[ex[i]]++;
    s.order[p] = i;
    s.pos[i] = p;
  }
  return s;
}


// The sorted rows [0, M) cut into one contiguous range per thread, each split at expert
// boundaries: (expert, begin, end) segments. One parallel region then runs every expert's
// GEMMs (single-threaded BLAS inside it) with the rows balanced across threads.
struct Segment {
  int64_t expert, begin, end;
  bool whole;  // the segment is all of its expert's rows
};

std::vector<std::vector<Segment>> split_rows(const std::vector<int64_t>& offsets, int64_t threads) {
  const int64_t E = static_cast<int64_t>(offsets.size()) - 1, M = offsets[E];
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, (M + 127) / 128));
  std::vector<std::vector<Segment>> out(parts);
  for (int64_t t = 0; t < parts; ++t) {
    const int64_t lo = M * t / parts, hi = M * (t + 1) / parts;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t a = std::max(lo, offsets[e]), b = std::min(hi, offsets[e + 1]);
      if (a < b) out[t].push_back({e, a, b, a == offsets[e] && b == offsets[e + 1]});
    }
  }
  return out;
}

// dst[p] = src[order[p] / k] (· scale[order[p]]), rows of width d
template <typename T, typename W>
void gather_rows(const T* src, const int64_t* order, int64_t M, int64_t k, int64_t d, T* dst, const W* scale) {
  {
    const int64_t p0 = 0, p1 = M;
    for (int64_t p = p0; p < p1; ++p) {
      const T* s = src + (order[p] / k) * d;
      T* o = dst + p * d;
      if (scale) {
        const T w = static_cast<T>(scale[order[p]]);
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) o[c] = s[c] * w;
      } else {
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) o[c] = s[c];
      }
    }
  }
}

// dst[t] = Σ_j (w[t,j] ·) rows[pos[t,j]] over the kept choices (zero when none)
template <typename T>
void combine_choices(const T* rows, const T* w, const int64_t* pos, int64_t T_, int64_t k, int64_t d, T* dst) {
  at::parallel_for(0, T_, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      T* yt = dst + t * d;
      for (int64_t c = 0; c < d; ++c) yt[c] = T(0);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t p = pos[t * k + j];
        if (p < 0) continue;
        const T wj = w ? w[t * k + j] : T(1);
        const T* r = rows + p * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) yt[c] += wj * r[c];
      }
    }
  });
}

// gw[t, j] = dy[t] · out[pos[t, j]] (zero for a dropped pair)
template <typename T>
void weight_grad(const T* gy, const T* out, const int64_t* pos, int64_t T_, int64_t k, int64_t d, T* gw) {
  at::parallel_for(0, T_, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < k; ++j) {
        const int64_t p = pos[t * k + j];
        T acc = 0;
        if (p >= 0) {
          const T* op = out + p * d;
          const T* gt = gy + t * d;
#pragma omp simd reduction(+ : acc)
          for (int64_t c = 0; c < d; ++c) acc += gt[c] * op[c];
        }
        gw[t * k + j] = acc;
      }
  });
}

at::Tensor act_fn(const at::Tensor& h, c10::string_view approximate) { return at::gelu(h, approximate); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_forward(const at::Tensor& x_in, const at::Tensor& expert_in,
                                                           const at::Tensor& slot_in, const at::Tensor& weight_in,
                                                           const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                                           const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                                                           c10::string_view approximate, bool save) {
  TORCH_CHECK(x_in.dim() == 2 && w1.dim() == 3 && w2.dim() == 3, "moe_forward: expected x [T,d], w1 [E,d,h], w2 [E,h,d]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "moe_forward: x must be float32 or float64, got ", x_in.scalar_type());
  TORCH_CHECK(weight_in.scalar_type() == x_in.scalar_type(), "moe_forward: weight must have x's dtype");
  auto x = x_in.contiguous(), expert = expert_in.contiguous(), slot = slot_in.contiguous(), weight = weight_in.contiguous();
  const int64_t T = x.size(0), d = x.size(1), E = w1.size(0), h = w1.size(2), k = expert.size(1);
  TORCH_CHECK(w1.size(1) == d && w2.size(0) == E && w2.size(1) == h && w2.size(2) == d, "moe_forward: w1 / w2 shapes");
  TORCH_CHECK(expert.sizes() == slot.sizes() && weight.sizes() == expert.sizes() && expert.size(0) == T,
              "moe_forward: expert, slot, weight must be [T, k]");
  PairSort ps = sort_pairs(expert, slot, E);
  const int64_t M = ps.offsets[E];
  // sized for every pair (the output shapes must not depend on the data); rows >= M unused
  auto hidden = at::empty({save ? T * k : M, h}, x.options());
  auto out = at::empty({save ? T * k : M, d}, x.options());
  auto y = at::empty({T, d}, x.options());
  const bool has_b1 = b1.has_value() && b1->defined(), has_b2 = b2.has_value() && b2->defined();
  const auto parts = split_rows(ps.offsets, at::get_num_threads());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "moe_forward", [&] {
    at::parallel_for(0, static_cast<int64_t>(parts.size()), 1, [&](int64_t t0, int64_t t1) {
      // worker threads start with grad mode on: stay below autograd like the calling op
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t t = t0; t < t1; ++t)
        for (const Segment& sg : parts[t]) {
          const int64_t n = sg.end - sg.begin;
          auto xs = at::empty({n, d}, x.options());
          gather_rows<scalar_t, scalar_t>(x.data_ptr<scalar_t>(), ps.order.data() + sg.begin, n, k, d,
                                          xs.data_ptr<scalar_t>(), nullptr);
          auto h_e = hidden.narrow(0, sg.begin, n);
          if (has_b1)
            at::addmm_out(h_e, (*b1)[sg.expert], xs, w1[sg.expert]);
          else
            at::mm_out(h_e, xs, w1[sg.expert]);
          auto o_e = out.narrow(0, sg.begin, n);
          if (has_b2)
            at::addmm_out(o_e, (*b2)[sg.expert], act_fn(h_e, approximate), w2[sg.expert]);
          else
            at::mm_out(o_e, act_fn(h_e, approximate), w2[sg.expert]);
        }
    });
    combine_choices<scalar_t>(out.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), ps.pos.data(), T, k, d,
                              y.data_ptr<scalar_t>());
  });
  if (!save) return {y, hidden.new_empty({0, h}), out.new_empty({0, d})};
  return {y, hidden, out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_backward(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& expert_in, const at::Tensor& slot_in,
    const at::Tensor& weight_in, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& hidden,
    const at::Tensor& out, c10::string_view approximate, bool bias_grads) {
  auto x = x_in.contiguous(), expert = expert_in.contiguous(), slot = slot_in.contiguous(), weight = weight_in.contiguous();
  auto gy = grad_y_in.contiguous();
  const int64_t T = x.size(0), d = x.size(1), E = w1.size(0), h = w1.size(2), k = expert.size(1);
  PairSort ps = sort_pairs(expert, slot, E);
  const int64_t M = ps.offsets[E];
  TORCH_CHECK(hidden.size(0) >= M && out.size(0) >= M, "moe_backward: saved buffers do not match the routing");
  auto grad_weight = at::empty({T, k}, x.options());
  auto grad_xs = at::empty({M, d}, x.options());
  auto grad_w1 = at::zeros_like(w1), grad_w2 = at::zeros_like(w2);
  auto grad_b1 = bias_grads ? at::zeros({E, h}, x.options()) : at::empty({0}, x.options());
  auto grad_b2 = bias_grads ? at::zeros({E, d}, x.options()) : at::empty({0}, x.options());
  auto grad_x = at::empty({T, d}, x.options());
  const auto parts = split_rows(ps.offsets, at::get_num_threads());
  // gradients of experts cut across threads: per-segment partials, added after the region
  std::vector<std::vector<std::tuple<int64_t, at::Tensor, at::Tensor, at::Tensor, at::Tensor>>> partial(parts.size());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "moe_backward", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const int64_t* pos = ps.pos.data();
    at::parallel_for(0, static_cast<int64_t>(parts.size()), 1, [&](int64_t t0, int64_t t1) {
      // worker threads start with grad mode on: stay below autograd like the calling op
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t t = t0; t < t1; ++t)
        for (const Segment& sg : parts[t]) {
          const int64_t e = sg.expert, n = sg.end - sg.begin;
          const int64_t* ord = ps.order.data() + sg.begin;
          auto go = at::empty({n, d}, x.options());  // w[pair] · dy[token]
          gather_rows<scalar_t, scalar_t>(gy.data_ptr<scalar_t>(), ord, n, k, d, go.data_ptr<scalar_t>(), w);
          auto xs = at::empty({n, d}, x.options());
          gather_rows<scalar_t, scalar_t>(x.data_ptr<scalar_t>(), ord, n, k, d, xs.data_ptr<scalar_t>(), nullptr);
          auto h_e = hidden.narrow(0, sg.begin, n);
          auto grad_hidden = at::gelu_backward(at::mm(go, w2[e].t()), h_e, approximate);
          auto gxs = grad_xs.narrow(0, sg.begin, n);
          at::mm_out(gxs, grad_hidden, w1[e].t());
          if (sg.whole) {
            auto gw2 = grad_w2[e];
            at::mm_out(gw2, act_fn(h_e, approximate).t(), go);
            auto gw1 = grad_w1[e];
            at::mm_out(gw1, xs.t(), grad_hidden);
            if (bias_grads) {
              auto gb2 = grad_b2[e];
              auto gb1 = grad_b1[e];
              at::sum_out(gb2, go, 0);
              at::sum_out(gb1, grad_hidden, 0);
            }
          } else {
            partial[t].emplace_back(e, at::mm(act_fn(h_e, approximate).t(), go), at::mm(xs.t(), grad_hidden),
                                    bias_grads ? go.sum(0) : at::Tensor(),
                                    bias_grads ? grad_hidden.sum(0) : at::Tensor());
          }
        }
    });
    for (const auto& list : partial)
      for (const auto& [e, gw2p, gw1p, gb2p, gb1p] : list) {
        grad_w2[e].add_(gw2p);
        grad_w1[e].add_(gw1p);
        if (bias_grads) {
          grad_b2[e].add_(gb2p);
          grad_b1[e].add_(gb1p);
        }
      }
    // d weight[t, j] = dy[t] · out[pos];  grad_x[t] = Σ_j grad_xs[pos[t, j]]
    weight_grad<scalar_t>(gy.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), pos, T, k, d,
                          grad_weight.data_ptr<scalar_t>());
    combine_choices<scalar_t>(grad_xs.data_ptr<scalar_t>(), nullptr, pos, T, k, d, grad_x.data_ptr<scalar_t>());
  });
  return {grad_x, grad_weight, grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace
}  // namespace m2mkd

TORCH_LIBRARY_IMPL(m2mkd_fast, CPU, m) {
  m.impl("moe_cpp_fwd", &m2mkd::moe_forward);
  m.impl("moe_cpp_bwd", &m2mkd::moe_backward);
}
