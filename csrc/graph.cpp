// Kernel-modulated graph attention on CPU (DESIGN §2.4): sparse attention over an edge list.
//
// The Python wrapper builds the edge list ONCE per call from the signatures (CSR: row_ptr over
// receivers, col = sender of each edge, only edges within the truncation radius) and the
// per-edge log-affinity; these kernels then visit only those edges:
//   graph_sample    per-batch relaxed-Bernoulli log-sample of every edge (Philox noise as
//                   Triton's tl.rand at offset (b*U + u)*V + v) and its derivative
//   graph_forward   o[b,h,u] = softmax_e(scale q·k_e + bias[b,e]) · v_e,  lse per row
//   graph_backward  dq, dk, dv and d bias (summed over heads; over batch when bias is shared)
// Rows without an edge give o = 0 and zero gradients.
#include <cmath>
#include <limits>
#include <vector>

#include "m2mkd.h"

namespace m2mkd {
namespace {

template <typename T>
struct GraphArgs {
  const T* q;
  const T* k;
  const T* v;
  const T* bias;  // [Bl, nnz]
  const T* o;
  const T* dout;
  const T* lse;
  const int64_t* row_ptr;
  const int64_t* col;
  T* out;    // forward: o;   backward: dq
  T* lse_out;
  T* dk;
  T* dv;
  T* dbias;  // [B*H, nnz]
  int64_t H, U, V, C, nnz;
  bool shared_bias;
  T scale;
};

// ---------------------------------------------------------------------------------------------
// forward: one task = a range of (b, h) pairs.
template <typename T>
M2_ALWAYS_INLINE void graph_fwd_body(const GraphArgs<T>& a, int64_t bh0, int64_t bh1) {
  const int64_t U = a.U, V = a.V, C = a.C;
  std::vector<T> sbuf(static_cast<size_t>(V) + 4);
  T* s = sbuf.data();
  const T scale = a.scale;
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    const int64_t b = bh / a.H;
    const T* qb = a.q + bh * U * C;
    const T* kb = a.k + bh * V * C;
    const T* vb = a.v + bh * V * C;
    const T* biasb = a.bias + (a.shared_bias ? 0 : b * a.nnz);
    T* ob = a.out + bh * U * C;
    T* lseb = a.lse_out + bh * U;
    for (int64_t u = 0; u < U; ++u) {
      const int64_t e0 = a.row_ptr[u];
      const int64_t n = a.row_ptr[u + 1] - e0;
      const int64_t* cu = a.col + e0;
      const T* bu = biasb + e0;
      const T* qu = qb + u * C;
      T* ou = ob + u * C;
      if (n == 0) {
        for (int64_t c = 0; c < C; ++c) ou[c] = T(0);
        lseb[u] = -std::numeric_limits<T>::infinity();
        continue;
      }
      // scores, four senders at a time (independent accumulator chains)
      T mx = -std::numeric_limits<T>::infinity();
      int64_t j = 0;
      for (; j + 4 <= n; j += 4) {
        const T* k0 = kb + cu[j] * C;
        const T* k1 = kb + cu[j + 1] * C;
        const T* k2 = kb + cu[j + 2] * C;
        const T* k3 = kb + cu[j + 3] * C;
        T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t c = 0; c < C; ++c) {
          const T x = qu[c];
          a0 += x * k0[c];
          a1 += x * k1[c];
          a2 += x * k2[c];
          a3 += x * k3[c];
        }
        s[j] = a0 * scale + bu[j];
        s[j + 1] = a1 * scale + bu[j + 1];
        s[j + 2] = a2 * scale + bu[j + 2];
        s[j + 3] = a3 * scale + bu[j + 3];
      }
      for (; j < n; ++j) {
        const T* k0 = kb + cu[j] * C;
        T a0 = 0;
#pragma omp simd reduction(+ : a0)
        for (int64_t c = 0; c < C; ++c) a0 += qu[c] * k0[c];
        s[j] = a0 * scale + bu[j];
      }
      for (j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
      T sum = 0;
      for (j = 0; j < n; ++j) {
        s[j] = std::exp(s[j] - mx);
        sum += s[j];
      }
      for (int64_t c = 0; c < C; ++c) ou[c] = T(0);
      j = 0;
      for (; j + 4 <= n; j += 4) {
        const T* v0 = vb + cu[j] * C;
        const T* v1 = vb + cu[j + 1] * C;
        const T* v2 = vb + cu[j + 2] * C;
        const T* v3 = vb + cu[j + 3] * C;
        const T p0 = s[j], p1 = s[j + 1], p2 = s[j + 2], p3 = s[j + 3];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) ou[c] += p0 * v0[c] + p1 * v1[c] + p2 * v2[c] + p3 * v3[c];
      }
      for (; j < n; ++j) {
        const T* v0 = vb + cu[j] * C;
        const T p0 = s[j];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) ou[c] += p0 * v0[c];
      }
      const T inv = T(1) / sum;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) ou[c] *= inv;
      lseb[u] = mx + std::log(sum);
    }
  }
}
M2_MULTIVERSION(graph_fwd, (const GraphArgs<scalar_t>& a, int64_t bh0, int64_t bh1), (a, bh0, bh1))

// ---------------------------------------------------------------------------------------------
// backward: one task = a range of (b, h) pairs; each owns its dk, dv slice and its row of
// dbias, so there are no write conflicts.
template <typename T>
M2_ALWAYS_INLINE void graph_bwd_body(const GraphArgs<T>& a, int64_t bh0, int64_t bh1) {
  const int64_t U = a.U, V = a.V, C = a.C;
  const T scale = a.scale;
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    const int64_t b = bh / a.H;
    const T* qb = a.q + bh * U * C;
    const T* kb = a.k + bh * V * C;
    const T* vb = a.v + bh * V * C;
    const T* ob = a.o + bh * U * C;
    const T* gb = a.dout + bh * U * C;
    const T* lseb = a.lse + bh * U;
    const T* biasb = a.bias + (a.shared_bias ? 0 : b * a.nnz);
    T* dqb = a.out + bh * U * C;
    T* dkb = a.dk + bh * V * C;
    T* dvb = a.dv + bh * V * C;
    T* dbb = a.dbias ? a.dbias + bh * a.nnz : nullptr;
    for (int64_t i = 0; i < V * C; ++i) {
      dkb[i] = T(0);
      dvb[i] = T(0);
    }
    for (int64_t u = 0; u < U; ++u) {
      const int64_t e0 = a.row_ptr[u];
      const int64_t n = a.row_ptr[u + 1] - e0;
      const int64_t* cu = a.col + e0;
      const T* bu = biasb + e0;
      const T* qu = qb + u * C;
      const T* gu = gb + u * C;
      const T* ou = ob + u * C;
      T* dqu = dqb + u * C;
      for (int64_t c = 0; c < C; ++c) dqu[c] = T(0);
      if (n == 0) continue;
      T D = 0;
#pragma omp simd reduction(+ : D)
      for (int64_t c = 0; c < C; ++c) D += gu[c] * ou[c];
      const T lse = lseb[u];
      int64_t j = 0;
      for (; j + 4 <= n; j += 4) {
        const T* k0 = kb + cu[j] * C;
        const T* k1 = kb + cu[j + 1] * C;
        const T* k2 = kb + cu[j + 2] * C;
        const T* k3 = kb + cu[j + 3] * C;
        const T* v0 = vb + cu[j] * C;
        const T* v1 = vb + cu[j + 1] * C;
        const T* v2 = vb + cu[j + 2] * C;
        const T* v3 = vb + cu[j + 3] * C;
        T s0 = 0, s1 = 0, s2 = 0, s3 = 0, d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, d0, d1, d2, d3)
        for (int64_t c = 0; c < C; ++c) {
          const T x = qu[c], g = gu[c];
          s0 += x * k0[c];
          s1 += x * k1[c];
          s2 += x * k2[c];
          s3 += x * k3[c];
          d0 += g * v0[c];
          d1 += g * v1[c];
          d2 += g * v2[c];
          d3 += g * v3[c];
        }
        const T p0 = std::exp(s0 * scale + bu[j] - lse);
        const T p1 = std::exp(s1 * scale + bu[j + 1] - lse);
        const T p2 = std::exp(s2 * scale + bu[j + 2] - lse);
        const T p3 = std::exp(s3 * scale + bu[j + 3] - lse);
        const T ds0 = p0 * (d0 - D), ds1 = p1 * (d1 - D), ds2 = p2 * (d2 - D), ds3 = p3 * (d3 - D);
        if (dbb) {
          dbb[e0 + j] = ds0;
          dbb[e0 + j + 1] = ds1;
          dbb[e0 + j + 2] = ds2;
          dbb[e0 + j + 3] = ds3;
        }
        const T g0 = ds0 * scale, g1 = ds1 * scale, g2 = ds2 * scale, g3 = ds3 * scale;
        T* dk0 = dkb + cu[j] * C;
        T* dk1 = dkb + cu[j + 1] * C;
        T* dk2 = dkb + cu[j + 2] * C;
        T* dk3 = dkb + cu[j + 3] * C;
        T* dv0 = dvb + cu[j] * C;
        T* dv1 = dvb + cu[j + 1] * C;
        T* dv2 = dvb + cu[j + 2] * C;
        T* dv3 = dvb + cu[j + 3] * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const T x = qu[c], g = gu[c];
          dqu[c] += g0 * k0[c] + g1 * k1[c] + g2 * k2[c] + g3 * k3[c];
          dk0[c] += g0 * x;
          dk1[c] += g1 * x;
          dk2[c] += g2 * x;
          dk3[c] += g3 * x;
          dv0[c] += p0 * g;
          dv1[c] += p1 * g;
          dv2[c] += p2 * g;
          dv3[c] += p3 * g;
        }
      }
      for (; j < n; ++j) {
        const T* k0 = kb + cu[j] * C;
        const T* v0 = vb + cu[j] * C;
        T s0 = 0, d0 = 0;
#pragma omp simd reduction(+ : s0, d0)
        for (int64_t c = 0; c < C; ++c) {
          s0 += qu[c] * k0[c];
          d0 += gu[c] * v0[c];
        }
        const T p0 = std::exp(s0 * scale + bu[j] - lse);
        const T ds0 = p0 * (d0 - D);
        if (dbb) dbb[e0 + j] = ds0;
        const T g0 = ds0 * scale;
        T* dk0 = dkb + cu[j] * C;
        T* dv0 = dvb + cu[j] * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          dqu[c] += g0 * k0[c];
          dk0[c] += g0 * qu[c];
          dv0[c] += p0 * gu[c];
        }
      }
    }
  }
}
M2_MULTIVERSION(graph_bwd, (const GraphArgs<scalar_t>& a, int64_t bh0, int64_t bh1), (a, bh0, bh1))

// ---------------------------------------------------------------------------------------------
void check_graph_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& row_ptr,
                        const at::Tensor& col, const at::Tensor& bias, const char* op) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D [B, H, *, C]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  q.scalar_type() == bias.scalar_type(),
              op, ": q, k, v and bias must share one dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
              ": expected float32 or float64 tensors, got ", q.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3), op,
              ": q [B,H,U,C] and k [B,H,V,C] disagree");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && bias.is_contiguous(), op,
              ": expected contiguous tensors");
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && col.scalar_type() == at::kLong && row_ptr.is_contiguous() &&
                  col.is_contiguous(),
              op, ": row_ptr and col must be contiguous int64");
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() == q.size(2) + 1, op, ": row_ptr must have U + 1 entries");
  TORCH_CHECK(bias.dim() == 2 && bias.size(1) == col.numel() && (bias.size(0) == 1 || bias.size(0) == q.size(0)), op,
              ": bias must be [1 or B, nnz]");
}

template <typename T>
GraphArgs<T> make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& row_ptr,
                       const at::Tensor& col, const at::Tensor& bias, double scale) {
  GraphArgs<T> a{};
  a.q = q.data_ptr<T>();
  a.k = k.data_ptr<T>();
  a.v = v.data_ptr<T>();
  a.bias = bias.data_ptr<T>();
  a.row_ptr = row_ptr.data_ptr<int64_t>();
  a.col = col.data_ptr<int64_t>();
  a.H = q.size(1);
  a.U = q.size(2);
  a.V = k.size(2);
  a.C = q.size(3);
  a.nnz = col.numel();
  a.shared_bias = bias.size(0) == 1;
  a.scale = static_cast<T>(scale);
  return a;
}

std::tuple<at::Tensor, at::Tensor> graph_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& row_ptr, const at::Tensor& col,
                                                 const at::Tensor& bias, double scale) {
  check_graph_inputs(q, k, v, row_ptr, col, bias, "graph_forward");
  auto out = at::empty_like(q);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  const int64_t BH = q.size(0) * q.size(1);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "graph_forward", [&] {
    auto a = make_args<scalar_t>(q, k, v, row_ptr, col, bias, scale);
    a.out = out.data_ptr<scalar_t>();
    a.lse_out = lse.data_ptr<scalar_t>();
    at::parallel_for(0, BH, 1, [&](int64_t s, int64_t e) { graph_fwd<scalar_t>(a, s, e); });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> graph_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& bias, double scale,
    bool bias_grad) {
  check_graph_inputs(q, k, v, row_ptr, col, bias, "graph_backward");
  auto g = grad_out.contiguous();
  TORCH_CHECK(g.sizes() == q.sizes() && out.sizes() == q.sizes() && out.is_contiguous() && lse.is_contiguous(),
              "graph_backward: grad_out / out / lse do not match q");
  auto dq = at::empty_like(q);
  auto dk = at::empty_like(k);
  auto dv = at::empty_like(v);
  const int64_t B = q.size(0), H = q.size(1), BH = B * H, nnz = col.numel();
  at::Tensor dbias_bh = bias_grad ? at::empty({B, H, nnz}, q.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "graph_backward", [&] {
    auto a = make_args<scalar_t>(q, k, v, row_ptr, col, bias, scale);
    a.o = out.data_ptr<scalar_t>();
    a.dout = g.data_ptr<scalar_t>();
    a.lse = lse.data_ptr<scalar_t>();
    a.out = dq.data_ptr<scalar_t>();
    a.dk = dk.data_ptr<scalar_t>();
    a.dv = dv.data_ptr<scalar_t>();
    a.dbias = bias_grad ? dbias_bh.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, BH, 1, [&](int64_t s, int64_t e) { graph_bwd<scalar_t>(a, s, e); });
  });
  at::Tensor dbias;
  if (bias_grad) {
    dbias = bias.size(0) == 1 ? dbias_bh.sum(at::IntArrayRef{0, 1}).unsqueeze(0) : dbias_bh.sum(1);
  } else {
    dbias = at::zeros_like(bias);
  }
  return {dq, dk, dv, dbias};
}

// ---------------------------------------------------------------------------------------------
// relaxed-Bernoulli log-sample per (batch element, edge), DESIGN §2.4 / HELPERS "shared RNG".
template <typename T>
void graph_sample_impl(const T* logit, const int64_t* row, const int64_t* col, int64_t B, int64_t U, int64_t V,
                       int64_t nnz, uint64_t seed, double temperature, T* lb, T* deriv) {
  const T eps = static_cast<T>(std::numeric_limits<float>::epsilon());
  const T one_m_eps = static_cast<T>(1.0f - std::numeric_limits<float>::epsilon());
  const float feps = std::numeric_limits<float>::epsilon();
  const T inv_t = static_cast<T>(1.0 / temperature);
  at::parallel_for(0, B * nnz, 4096, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) {
      const int64_t b = i / nnz, j = i % nnz;
      const uint32_t offset = static_cast<uint32_t>((b * U + row[j]) * V + col[j]);
      float nf = philox_rand(seed, offset);
      nf = nf < feps ? feps : (nf > 1.0f - feps ? 1.0f - feps : nf);
      const T n = static_cast<T>(nf);
      const T praw = std::exp(logit[j]);
      const T p = praw < eps ? eps : (praw > one_m_eps ? one_m_eps : praw);
      const T z = (std::log(p) - std::log1p(-p) + std::log(n) - std::log1p(-n)) * inv_t;
      const T zmin = z < T(0) ? z : T(0);
      lb[i] = zmin - std::log1p(std::exp(-std::abs(z)));
      // d lb / d logit = sigmoid(-z) * (1/t) * (1/(p(1-p))) * p, zero where the clamp bites
      const T sig_neg = T(1) / (T(1) + std::exp(z));
      deriv[i] = (praw >= eps && praw <= one_m_eps) ? sig_neg * inv_t / (T(1) - p) : T(0);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> graph_sample(const at::Tensor& logit, const at::Tensor& row, const at::Tensor& col,
                                                int64_t batch, int64_t num_receivers, int64_t num_senders,
                                                int64_t seed, double temperature) {
  TORCH_CHECK(logit.dim() == 1 && row.sizes() == logit.sizes() && col.sizes() == logit.sizes(),
              "graph_sample: logit, row, col must be 1-D of one length");
  TORCH_CHECK(row.scalar_type() == at::kLong && col.scalar_type() == at::kLong, "graph_sample: row, col must be int64");
  TORCH_CHECK(logit.scalar_type() == at::kFloat || logit.scalar_type() == at::kDouble,
              "graph_sample: logit must be float32 or float64");
  TORCH_CHECK(temperature > 0, "graph_sample: temperature must be > 0, got ", temperature);
  TORCH_CHECK(batch * num_receivers * num_senders < (int64_t(1) << 31),
              "graph_sample: B*U*V must be < 2**31 (int32 Philox offsets), got ", batch * num_receivers * num_senders);
  auto l = logit.contiguous();
  auto r = row.contiguous();
  auto c = col.contiguous();
  const int64_t nnz = l.numel();
  auto lb = at::empty({batch, nnz}, l.options());
  auto deriv = at::empty({batch, nnz}, l.options());
  AT_DISPATCH_FLOATING_TYPES(l.scalar_type(), "graph_sample", [&] {
    graph_sample_impl<scalar_t>(l.data_ptr<scalar_t>(), r.data_ptr<int64_t>(), c.data_ptr<int64_t>(), batch,
                                num_receivers, num_senders, nnz, static_cast<uint64_t>(seed), temperature,
                                lb.data_ptr<scalar_t>(), deriv.data_ptr<scalar_t>());
  });
  return {lb, deriv};
}

at::Tensor philox_uniform(int64_t seed, const at::Tensor& offsets) {
  TORCH_CHECK(offsets.scalar_type() == at::kInt || offsets.scalar_type() == at::kLong,
              "philox_uniform: offsets must be int32 or int64");
  auto off = offsets.to(at::kLong).contiguous();
  auto out = at::empty(off.sizes(), off.options().dtype(at::kFloat));
  const int64_t* o = off.data_ptr<int64_t>();
  float* dst = out.data_ptr<float>();
  const uint64_t s = static_cast<uint64_t>(seed);
  at::parallel_for(0, off.numel(), 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dst[i] = philox_rand(s, static_cast<uint32_t>(o[i]));
  });
  return out;
}

}  // namespace
}  // namespace m2mkd

TORCH_LIBRARY_IMPL(m2mkd_fast_cpp, CPU, m) {
  m.impl("philox_uniform", &m2mkd::philox_uniform);
  m.impl("graph_sample", &m2mkd::graph_sample);
  m.impl("graph_forward", &m2mkd::graph_forward);
  m.impl("graph_backward", &m2mkd::graph_backward);
}
