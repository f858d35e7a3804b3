// Kernel-modulated graph attention on CPU (docs/design.md §2.4): sparse attention over an edge list.
//
// The Python wrapper builds the edge list ONCE per call from the signatures (CSR: row_ptr over
// receivers, col = sender of each edge, only edges within the truncation radius) and the
// per-edge log-affinity; these kernels then visit only those edges:
//   graph_sample    per-batch relaxed-Bernoulli log-sample of every edge (Philox noise as
//                   Triton's tl.rand at offset (b*U + u)*V + v) and its derivative
//   graph_forward   o[b,h,u] = softmax_e(scale q·k_e + bias[b,e]) · v_e,  lse per row
//   graph_backward  dq, dk, dv and d bias (summed over heads; over batch when bias is shared)
// Rows without an edge give o = 0 and zero gradients.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>
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
  const int64_t* col_ptr;   // backward: CSC view of the same edges
  const int64_t* csc_row;
  const int64_t* csc_edge;
  T* out;      // forward: o;   backward: dq
  T* lse_out;
  T* dk;
  T* dv;
  T* dbias_acc;  // backward: per-thread accumulators [threads, Bl, nnz] (or null)
  int64_t H, U, V, C, nnz, Bl;
  bool shared_bias;
  T scale;
};

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// =============================================================================================
// Generic path (any C, float32 or float64): plain loops the compiler vectorises.
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
      T mx = -std::numeric_limits<T>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        const T* k0 = kb + cu[j] * C;
        T a0 = 0;
#pragma omp simd reduction(+ : a0)
        for (int64_t c = 0; c < C; ++c) a0 += qu[c] * k0[c];
        s[j] = a0 * scale + bu[j];
        mx = s[j] > mx ? s[j] : mx;
      }
      T sum = 0;
      for (int64_t j = 0; j < n; ++j) {
        s[j] = std::exp(s[j] - mx);
        sum += s[j];
      }
      for (int64_t c = 0; c < C; ++c) ou[c] = T(0);
      for (int64_t j = 0; j < n; ++j) {
        const T* v0 = vb + cu[j] * C;
        const T p0 = s[j];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) ou[c] += p0 * v0[c];
      }
      const T inv = T(1) / sum;
      for (int64_t c = 0; c < C; ++c) ou[c] *= inv;
      lseb[u] = mx + std::log(sum);
    }
  }
}
M2_MULTIVERSION(graph_fwd, (const GraphArgs<scalar_t>& a, int64_t bh0, int64_t bh1), (a, bh0, bh1))

// backward: one task = a range of (b, h) pairs. Pass 1 walks the receiver rows (CSR): dq, and
// p, ds per edge into scratch; pass 2 walks the sender columns (CSC): dk, dv accumulate in
// registers. The bias gradient (ds summed over heads) goes to the calling thread's accumulator.
template <typename T>
M2_ALWAYS_INLINE void graph_bwd_body(const GraphArgs<T>& a, int64_t bh0, int64_t bh1) {
  const int64_t U = a.U, V = a.V, C = a.C, nnz = a.nnz;
  const T scale = a.scale;
  std::vector<T> pbuf(static_cast<size_t>(nnz) + 1), dsbuf(static_cast<size_t>(nnz) + 1);
  T* pe = pbuf.data();
  T* dse = dsbuf.data();
  T* acc = a.dbias_acc ? a.dbias_acc + at::get_thread_num() * a.Bl * nnz : nullptr;
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    const int64_t b = bh / a.H;
    const T* qb = a.q + bh * U * C;
    const T* kb = a.k + bh * V * C;
    const T* vb = a.v + bh * V * C;
    const T* ob = a.o + bh * U * C;
    const T* gb = a.dout + bh * U * C;
    const T* lseb = a.lse + bh * U;
    const T* biasb = a.bias + (a.shared_bias ? 0 : b * nnz);
    T* dqb = a.out + bh * U * C;
    T* dkb = a.dk + bh * V * C;
    T* dvb = a.dv + bh * V * C;
    T* accb = acc ? acc + (a.shared_bias ? 0 : b * nnz) : nullptr;
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
      for (int64_t j = 0; j < n; ++j) {
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
        pe[e0 + j] = p0;
        dse[e0 + j] = ds0;
        if (accb) accb[e0 + j] += ds0;
        const T g0 = ds0 * scale;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dqu[c] += g0 * k0[c];
      }
    }
    for (int64_t v = 0; v < V; ++v) {
      T* dkv = dkb + v * C;
      T* dvv = dvb + v * C;
      for (int64_t c = 0; c < C; ++c) {
        dkv[c] = T(0);
        dvv[c] = T(0);
      }
      for (int64_t t = a.col_ptr[v]; t < a.col_ptr[v + 1]; ++t) {
        const int64_t u = a.csc_row[t], e = a.csc_edge[t];
        const T g0 = dse[e] * scale, p0 = pe[e];
        const T* qu = qb + u * C;
        const T* gu = gb + u * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          dkv[c] += g0 * qu[c];
          dvv[c] += p0 * gu[c];
        }
      }
    }
  }
}
M2_MULTIVERSION(graph_bwd, (const GraphArgs<scalar_t>& a, int64_t bh0, int64_t bh1), (a, bh0, bh1))

// =============================================================================================
// Fast path: float32 with C = 16·NV. q rows, dq, dk, dv and o live in NV vector registers;
// four edges' dot products are reduced together (hsum4); exp is vectorised.
template <int NV>
M2_ALWAYS_INLINE void graph_fwd_fast_body(const GraphArgs<float>& a, int64_t bh0, int64_t bh1) {
  using namespace vec;
  constexpr int64_t C = 16 * NV;
  const int64_t U = a.U, V = a.V;
  std::vector<float> sbuf(static_cast<size_t>(V) + 32);
  float* s = sbuf.data();
  const float scale = a.scale;
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    const int64_t b = bh / a.H;
    const float* qb = a.q + bh * U * C;
    const float* kb = a.k + bh * V * C;
    const float* vb = a.v + bh * V * C;
    const float* biasb = a.bias + (a.shared_bias ? 0 : b * a.nnz);
    float* ob = a.out + bh * U * C;
    float* lseb = a.lse_out + bh * U;
    for (int64_t u = 0; u < U; ++u) {
      const int64_t e0 = a.row_ptr[u];
      const int64_t n = a.row_ptr[u + 1] - e0;
      const int64_t* cu = a.col + e0;
      const float* bu = biasb + e0;
      float* ou = ob + u * C;
      if (n == 0) {
        for (int i = 0; i < NV; ++i) store(ou + 16 * i, splat<v16>(0.0f));
        lseb[u] = kNegInf;
        continue;
      }
      v16 qv[NV];
      for (int i = 0; i < NV; ++i) qv[i] = load<v16>(qb + u * C + 16 * i);
      v4 mx4 = splat<v4>(kNegInf);
      for (int64_t j = 0; j < n; j += 4) {
        const int64_t rem = n - j;
        const float* k0 = kb + cu[j] * C;
        const float* k1 = kb + cu[rem > 1 ? j + 1 : j] * C;
        const float* k2 = kb + cu[rem > 2 ? j + 2 : j] * C;
        const float* k3 = kb + cu[rem > 3 ? j + 3 : j] * C;
        v16 a0 = qv[0] * load<v16>(k0), a1 = qv[0] * load<v16>(k1);
        v16 a2 = qv[0] * load<v16>(k2), a3 = qv[0] * load<v16>(k3);
        for (int i = 1; i < NV; ++i) {
          a0 += qv[i] * load<v16>(k0 + 16 * i);
          a1 += qv[i] * load<v16>(k1 + 16 * i);
          a2 += qv[i] * load<v16>(k2 + 16 * i);
          a3 += qv[i] * load<v16>(k3 + 16 * i);
        }
        v4 bias4;
        if (rem >= 4) {
          bias4 = load<v4>(bu + j);
        } else {
          bias4 = splat<v4>(kNegInf);
          for (int64_t t = 0; t < rem; ++t) bias4[t] = bu[j + t];
        }
        const v4 sc = hsum4(a0, a1, a2, a3) * scale + bias4;
        store(s + j, sc);
        mx4 = sc > mx4 ? sc : mx4;
      }
      const int64_t n16 = (n + 15) & ~int64_t(15);
      for (int64_t j = (n + 3) & ~int64_t(3); j < n16; ++j) s[j] = kNegInf;
      const float mx = std::max(std::max(mx4[0], mx4[1]), std::max(mx4[2], mx4[3]));
      v16 sum16 = splat<v16>(0.0f);
      for (int64_t j = 0; j < n16; j += 16) {
        const v16 e = vec::exp<v16, v16i>(load<v16>(s + j) - mx);
        store(s + j, e);
        sum16 += e;
      }
      const float sum = hsum(sum16);
      v16 oa[NV], ob2[NV];
      for (int i = 0; i < NV; ++i) oa[i] = ob2[i] = splat<v16>(0.0f);
      int64_t j = 0;
      for (; j + 2 <= n; j += 2) {
        const float* v0 = vb + cu[j] * C;
        const float* v1 = vb + cu[j + 1] * C;
        const float p0 = s[j], p1 = s[j + 1];
        for (int i = 0; i < NV; ++i) {
          oa[i] += p0 * load<v16>(v0 + 16 * i);
          ob2[i] += p1 * load<v16>(v1 + 16 * i);
        }
      }
      if (j < n) {
        const float* v0 = vb + cu[j] * C;
        const float p0 = s[j];
        for (int i = 0; i < NV; ++i) oa[i] += p0 * load<v16>(v0 + 16 * i);
      }
      const float inv = 1.0f / sum;
      for (int i = 0; i < NV; ++i) store(ou + 16 * i, (oa[i] + ob2[i]) * inv);
      lseb[u] = mx + std::log(sum);
    }
  }
}

template <int NV>
M2_ALWAYS_INLINE void graph_bwd_fast_body(const GraphArgs<float>& a, int64_t bh0, int64_t bh1) {
  using namespace vec;
  constexpr int64_t C = 16 * NV;
  const int64_t U = a.U, V = a.V, nnz = a.nnz;
  const float scale = a.scale;
  std::vector<float> pbuf(static_cast<size_t>(nnz) + 4), gbuf(static_cast<size_t>(nnz) + 4);
  float* pe = pbuf.data();
  float* ge = gbuf.data();  // scale * ds per edge
  float* acc = a.dbias_acc ? a.dbias_acc + at::get_thread_num() * a.Bl * nnz : nullptr;
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    const int64_t b = bh / a.H;
    const float* qb = a.q + bh * U * C;
    const float* kb = a.k + bh * V * C;
    const float* vb = a.v + bh * V * C;
    const float* ob = a.o + bh * U * C;
    const float* gb = a.dout + bh * U * C;
    const float* lseb = a.lse + bh * U;
    const float* biasb = a.bias + (a.shared_bias ? 0 : b * nnz);
    float* dqb = a.out + bh * U * C;
    float* dkb = a.dk + bh * V * C;
    float* dvb = a.dv + bh * V * C;
    float* accb = acc ? acc + (a.shared_bias ? 0 : b * nnz) : nullptr;
    for (int64_t u = 0; u < U; ++u) {
      const int64_t e0 = a.row_ptr[u];
      const int64_t n = a.row_ptr[u + 1] - e0;
      const int64_t* cu = a.col + e0;
      const float* bu = biasb + e0;
      float* dqu = dqb + u * C;
      if (n == 0) {
        for (int i = 0; i < NV; ++i) store(dqu + 16 * i, splat<v16>(0.0f));
        continue;
      }
      v16 qv[NV], gv[NV], dq[NV];
      v16 dacc = splat<v16>(0.0f);
      for (int i = 0; i < NV; ++i) {
        qv[i] = load<v16>(qb + u * C + 16 * i);
        gv[i] = load<v16>(gb + u * C + 16 * i);
        dacc += gv[i] * load<v16>(ob + u * C + 16 * i);
        dq[i] = splat<v16>(0.0f);
      }
      const float D = hsum(dacc);
      const float lse = lseb[u];
      for (int64_t j = 0; j < n; j += 4) {
        const int64_t rem = n - j;
        const int64_t c0 = cu[j], c1 = cu[rem > 1 ? j + 1 : j], c2 = cu[rem > 2 ? j + 2 : j],
                      c3 = cu[rem > 3 ? j + 3 : j];
        const float *k0 = kb + c0 * C, *k1 = kb + c1 * C, *k2 = kb + c2 * C, *k3 = kb + c3 * C;
        const float *v0 = vb + c0 * C, *v1 = vb + c1 * C, *v2 = vb + c2 * C, *v3 = vb + c3 * C;
        v16 s0 = qv[0] * load<v16>(k0), s1 = qv[0] * load<v16>(k1);
        v16 s2 = qv[0] * load<v16>(k2), s3 = qv[0] * load<v16>(k3);
        v16 d0 = gv[0] * load<v16>(v0), d1 = gv[0] * load<v16>(v1);
        v16 d2 = gv[0] * load<v16>(v2), d3 = gv[0] * load<v16>(v3);
        for (int i = 1; i < NV; ++i) {
          s0 += qv[i] * load<v16>(k0 + 16 * i);
          s1 += qv[i] * load<v16>(k1 + 16 * i);
          s2 += qv[i] * load<v16>(k2 + 16 * i);
          s3 += qv[i] * load<v16>(k3 + 16 * i);
          d0 += gv[i] * load<v16>(v0 + 16 * i);
          d1 += gv[i] * load<v16>(v1 + 16 * i);
          d2 += gv[i] * load<v16>(v2 + 16 * i);
          d3 += gv[i] * load<v16>(v3 + 16 * i);
        }
        v4 bias4;
        if (rem >= 4) {
          bias4 = load<v4>(bu + j);
        } else {
          bias4 = splat<v4>(kNegInf);
          for (int64_t t = 0; t < rem; ++t) bias4[t] = bu[j + t];
        }
        const v4 p4 = vec::exp<v4, v4i>(hsum4(s0, s1, s2, s3) * scale + bias4 - lse);
        const v4 ds4 = p4 * (hsum4(d0, d1, d2, d3) - D);
        const v4 g4 = ds4 * scale;
        if (rem >= 4) {
          store(pe + e0 + j, p4);
          store(ge + e0 + j, g4);
          if (accb) store(accb + e0 + j, load<v4>(accb + e0 + j) + ds4);
        } else {
          for (int64_t t = 0; t < rem; ++t) {
            pe[e0 + j + t] = p4[t];
            ge[e0 + j + t] = g4[t];
            if (accb) accb[e0 + j + t] += ds4[t];
          }
        }
        // padded lanes have p = 0, so g = 0: they add nothing to dq
        for (int i = 0; i < NV; ++i)
          dq[i] += g4[0] * load<v16>(k0 + 16 * i) + g4[1] * load<v16>(k1 + 16 * i) +
                   g4[2] * load<v16>(k2 + 16 * i) + g4[3] * load<v16>(k3 + 16 * i);
      }
      for (int i = 0; i < NV; ++i) store(dqu + 16 * i, dq[i]);
    }
    for (int64_t v = 0; v < V; ++v) {
      v16 dk[NV], dv[NV];
      for (int i = 0; i < NV; ++i) dk[i] = dv[i] = splat<v16>(0.0f);
      for (int64_t t = a.col_ptr[v]; t < a.col_ptr[v + 1]; ++t) {
        const int64_t u = a.csc_row[t], e = a.csc_edge[t];
        const float g0 = ge[e], p0 = pe[e];
        const float* qu = qb + u * C;
        const float* gu = gb + u * C;
        for (int i = 0; i < NV; ++i) {
          dk[i] += g0 * load<v16>(qu + 16 * i);
          dv[i] += p0 * load<v16>(gu + 16 * i);
        }
      }
      for (int i = 0; i < NV; ++i) {
        store(dkb + v * C + 16 * i, dk[i]);
        store(dvb + v * C + 16 * i, dv[i]);
      }
    }
  }
}

#define M2_GRAPH_FAST(NV)                                                                               \
  M2_TARGET_AVX512 void graph_fwd_fast##NV##_avx512(const GraphArgs<float>& a, int64_t s, int64_t e) { \
    graph_fwd_fast_body<NV>(a, s, e);                                                                   \
  }                                                                                                     \
  M2_TARGET_AVX2 void graph_fwd_fast##NV##_avx2(const GraphArgs<float>& a, int64_t s, int64_t e) {     \
    graph_fwd_fast_body<NV>(a, s, e);                                                                   \
  }                                                                                                     \
  void graph_fwd_fast##NV##_base(const GraphArgs<float>& a, int64_t s, int64_t e) {                     \
    graph_fwd_fast_body<NV>(a, s, e);                                                                   \
  }                                                                                                     \
  M2_TARGET_AVX512 void graph_bwd_fast##NV##_avx512(const GraphArgs<float>& a, int64_t s, int64_t e) { \
    graph_bwd_fast_body<NV>(a, s, e);                                                                   \
  }                                                                                                     \
  M2_TARGET_AVX2 void graph_bwd_fast##NV##_avx2(const GraphArgs<float>& a, int64_t s, int64_t e) {     \
    graph_bwd_fast_body<NV>(a, s, e);                                                                   \
  }                                                                                                     \
  void graph_bwd_fast##NV##_base(const GraphArgs<float>& a, int64_t s, int64_t e) {                     \
    graph_bwd_fast_body<NV>(a, s, e);                                                                   \
  }
M2_GRAPH_FAST(1)
M2_GRAPH_FAST(2)
M2_GRAPH_FAST(4)
M2_GRAPH_FAST(8)

using GraphFn = void (*)(const GraphArgs<float>&, int64_t, int64_t);

// The fast kernel for this head dim and CPU, or null (then the generic path runs).
GraphFn graph_fast_kernel(int64_t C, bool backward) {
#define M2_PICK(NV)                                                                                   \
  case NV: {                                                                                          \
    switch (active_isa()) {                                                                           \
      case Isa::Avx512: return backward ? graph_bwd_fast##NV##_avx512 : graph_fwd_fast##NV##_avx512; \
      case Isa::Avx2: return backward ? graph_bwd_fast##NV##_avx2 : graph_fwd_fast##NV##_avx2;       \
      default: return backward ? graph_bwd_fast##NV##_base : graph_fwd_fast##NV##_base;              \
    }                                                                                                 \
  }
  if (C % 16 != 0 || std::getenv("M2MKD_CPP_GENERIC")) return nullptr;
  switch (C / 16) {
    M2_PICK(1)
    M2_PICK(2)
    M2_PICK(4)
    M2_PICK(8)
    default: return nullptr;
  }
#undef M2_PICK
}

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
  a.Bl = bias.size(0);
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
    GraphFn fast = std::is_same_v<scalar_t, float> ? graph_fast_kernel(a.C, false) : nullptr;
    at::parallel_for(0, BH, 1, [&](int64_t s, int64_t e) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (fast) return fast(reinterpret_cast<const GraphArgs<float>&>(a), s, e);
      }
      graph_fwd<scalar_t>(a, s, e);
    });
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
  const int64_t B = q.size(0), H = q.size(1), BH = B * H, V = k.size(2), nnz = col.numel();
  const int64_t Bl = bias.size(0);
  // CSC view of the edges (counting sort by sender; receivers stay ascending in a column)
  auto col_ptr = at::zeros({V + 1}, row_ptr.options());
  auto csc_row = at::empty({nnz}, row_ptr.options());
  auto csc_edge = at::empty({nnz}, row_ptr.options());
  {
    const int64_t* rp = row_ptr.data_ptr<int64_t>();
    const int64_t* cc = col.data_ptr<int64_t>();
    int64_t* cp = col_ptr.data_ptr<int64_t>();
    int64_t* cr = csc_row.data_ptr<int64_t>();
    int64_t* ce = csc_edge.data_ptr<int64_t>();
    for (int64_t e = 0; e < nnz; ++e) {
      TORCH_CHECK(cc[e] >= 0 && cc[e] < V, "graph_backward: col out of range");
      cp[cc[e] + 1]++;
    }
    for (int64_t v = 0; v < V; ++v) cp[v + 1] += cp[v];
    std::vector<int64_t> fill(cp, cp + V);
    const int64_t U = q.size(2);
    for (int64_t u = 0; u < U; ++u)
      for (int64_t e = rp[u]; e < rp[u + 1]; ++e) {
        const int64_t t = fill[cc[e]]++;
        cr[t] = u;
        ce[t] = e;
      }
  }
  at::Tensor acc = bias_grad ? at::zeros({at::get_num_threads(), Bl, nnz}, q.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "graph_backward", [&] {
    auto a = make_args<scalar_t>(q, k, v, row_ptr, col, bias, scale);
    a.o = out.data_ptr<scalar_t>();
    a.dout = g.data_ptr<scalar_t>();
    a.lse = lse.data_ptr<scalar_t>();
    a.col_ptr = col_ptr.data_ptr<int64_t>();
    a.csc_row = csc_row.data_ptr<int64_t>();
    a.csc_edge = csc_edge.data_ptr<int64_t>();
    a.out = dq.data_ptr<scalar_t>();
    a.dk = dk.data_ptr<scalar_t>();
    a.dv = dv.data_ptr<scalar_t>();
    a.dbias_acc = bias_grad ? acc.data_ptr<scalar_t>() : nullptr;
    GraphFn fast = std::is_same_v<scalar_t, float> ? graph_fast_kernel(a.C, true) : nullptr;
    at::parallel_for(0, BH, 1, [&](int64_t s, int64_t e) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (fast) return fast(reinterpret_cast<const GraphArgs<float>&>(a), s, e);
      }
      graph_bwd<scalar_t>(a, s, e);
    });
  });
  at::Tensor dbias = bias_grad ? acc.sum(0) : at::zeros_like(bias);
  return {dq, dk, dv, dbias};
}

// ---------------------------------------------------------------------------------------------
// relaxed-Bernoulli log-sample per (batch element, edge), docs/design.md §2.4 / HELPERS "shared RNG".
template <typename T>
struct SampleArgs {
  const T* logit_term;  // per edge: log p - log1p(-p), p = clamp(exp(logit), eps, 1 - eps)
  const T* deriv_term;  // per edge: (clamp inactive) / (t (1 - p)), else 0
  const int64_t* row;
  const int64_t* col;
  T* lb;
  T* deriv;
  int64_t U, V, nnz, chunks;
  uint64_t seed;
  T inv_t;
};
constexpr int64_t kSampleChunk = 256;

// one task = a range of (b, chunk of edges); the Philox draws of a chunk are a vector loop
template <typename T>
M2_ALWAYS_INLINE void graph_sample_kernel_body(const SampleArgs<T>& a, int64_t t0, int64_t t1) {
  const float feps = std::numeric_limits<float>::epsilon();
  const uint64_t seed = a.seed;
  float nbuf[kSampleChunk];
  for (int64_t task = t0; task < t1; ++task) {
    const int64_t b = task / a.chunks;
    const int64_t j0 = (task % a.chunks) * kSampleChunk;
    const int64_t cnt = std::min<int64_t>(kSampleChunk, a.nnz - j0);
    const int64_t* row = a.row + j0;
    const int64_t* col = a.col + j0;
    const uint32_t base = static_cast<uint32_t>(b * a.U);
    const uint32_t V = static_cast<uint32_t>(a.V);
#pragma omp simd
    for (int64_t t = 0; t < cnt; ++t) {
      const uint32_t offset = (base + static_cast<uint32_t>(row[t])) * V + static_cast<uint32_t>(col[t]);
      const float n = philox_rand(seed, offset);
      nbuf[t] = n < feps ? feps : (n > 1.0f - feps ? 1.0f - feps : n);
    }
    const T* lt = a.logit_term + j0;
    const T* dt = a.deriv_term + j0;
    T* lb = a.lb + b * a.nnz + j0;
    T* deriv = a.deriv + b * a.nnz + j0;
    int64_t t = 0;
    if constexpr (std::is_same_v<T, float>) {
      using namespace vec;
      for (; t + 16 <= cnt; t += 16) {
        const v16 n = load<v16>(nbuf + t);
        const v16 z = (load<v16>(lt + t) + (vec::log<v16, v16i>(n) - vec::log1p<v16, v16i>(-n))) * a.inv_t;
        const v16 az = z < 0.0f ? -z : z;
        const v16 e = vec::exp<v16, v16i>(-az);
        const v16 zero = splat<v16>(0.0f);
        store(lb + t, (z < 0.0f ? z : zero) - vec::log1p<v16, v16i>(e));
        const v16 inv1pe = 1.0f / (e + 1.0f);
        store(deriv + t, (z >= 0.0f ? e * inv1pe : inv1pe) * load<v16>(dt + t));
      }
    }
    for (; t < cnt; ++t) {
      const T n = static_cast<T>(nbuf[t]);
      const T z = (lt[t] + (std::log(n) - std::log1p(-n))) * a.inv_t;
      const T e = std::exp(-std::abs(z));  // in (0, 1]
      lb[t] = (z < T(0) ? z : T(0)) - std::log1p(e);
      const T sig_neg = z >= T(0) ? e / (T(1) + e) : T(1) / (T(1) + e);  // sigmoid(-z)
      deriv[t] = sig_neg * dt[t];
    }
  }
}
M2_MULTIVERSION(graph_sample_kernel, (const SampleArgs<scalar_t>& a, int64_t s, int64_t e), (a, s, e))

// relaxed-Bernoulli log-sample per (batch element, edge), docs/design.md §2.4 / HELPERS "shared RNG":
// lb = logsigmoid((logit p + logit n) / t), deriv = d lb / d logit = sigmoid(-z) / (t (1 - p))
// (p = exp(logit), zero where the clamp of p to [eps, 1 - eps] is active).
template <typename T>
void graph_sample_impl(const T* logit, const int64_t* row, const int64_t* col, int64_t B, int64_t U, int64_t V,
                       int64_t nnz, uint64_t seed, double temperature, T* lb, T* deriv) {
  const T eps = static_cast<T>(std::numeric_limits<float>::epsilon());
  const T one_m_eps = static_cast<T>(1.0f - std::numeric_limits<float>::epsilon());
  const T inv_t = static_cast<T>(1.0 / temperature);
  std::vector<T> logit_term(static_cast<size_t>(nnz)), deriv_term(static_cast<size_t>(nnz));
  at::parallel_for(0, nnz, 2048, [&](int64_t s, int64_t e) {
    for (int64_t j = s; j < e; ++j) {
      const T praw = std::exp(logit[j]);
      const T p = praw < eps ? eps : (praw > one_m_eps ? one_m_eps : praw);
      logit_term[j] = std::log(p) - std::log1p(-p);
      deriv_term[j] = (praw >= eps && praw <= one_m_eps) ? inv_t / (T(1) - p) : T(0);
    }
  });
  SampleArgs<T> a{logit_term.data(), deriv_term.data(), row, col, lb, deriv, U, V, nnz,
                  (nnz + kSampleChunk - 1) / kSampleChunk, seed, inv_t};
  at::parallel_for(0, B * a.chunks, 4, [&](int64_t s, int64_t e) { graph_sample_kernel<T>(a, s, e); });
}

std::tuple<at::Tensor, at::Tensor> graph_sample(const at::Tensor& logit, const at::Tensor& row, const at::Tensor& col,
                                                int64_t batch, int64_t num_receivers, int64_t num_senders,
                                                const at::Tensor& seed, double temperature) {
  TORCH_CHECK(seed.dim() == 0 && seed.device().is_cpu() && !seed.is_floating_point() && !seed.is_complex(),
              "graph_sample: seed must be a 0-dim integer CPU tensor, got ", seed.dim(), "-dim ", seed.scalar_type(),
              " on ", seed.device());
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
                                num_receivers, num_senders, nnz, static_cast<uint64_t>(seed.item<int64_t>()), temperature,
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

TORCH_LIBRARY_IMPL(m2mkd_fast, CPU, m) {
  m.impl("graph_cpp_philox", &m2mkd::philox_uniform);
  m.impl("graph_cpp_sample", &m2mkd::graph_sample);
  m.impl("graph_cpp_fwd", &m2mkd::graph_forward);
  m.impl("graph_cpp_bwd", &m2mkd::graph_backward);
}
