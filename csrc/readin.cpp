// Folded NAC read-in attention on CPU (docs/design.md §2.3).
//
//   Tk = W_kᵀ q (per head)                      [B, U, H, Din]   (saved)
//   Q' = Tk ⊙ s_k[u] / √C                        never stored whole
//   A  = softmax_v(Q' xᵀ) x                      [B, U, H, Din]   (saved, with the row lse)
//   m  = W_v (A ⊙ s_v[u]) + b_v                  [B, U, H, C]
//
// The keys and values are the tokens x themselves, shared by all heads: for one batch element
// the U·H query rows are one matrix attending to one [V, Din] matrix. The projections are
// batched GEMMs over all rows (ATen bmm); the attention runs per batch element and block of
// rows (scores of at most kReadinBlock rows × V live in a thread-local buffer; nothing of size
// B·U·V), with the s_k / s_v scalings, the softmax and the s_k / s_v gradient reductions fused
// into the passes over each block. Every GEMM goes through ATen (mm_out / addmm_out).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "m2mkd.h"

namespace m2mkd {
namespace {

constexpr int64_t kReadinBlockElems = 1 << 15;  // rows × V of one score block

template <typename T>
at::Tensor view2d(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// C[m, n] (+)= op(A) @ op(B) through ATen's BLAS-backed mm. A is [m, k] (or [k, m] if ta).
template <typename T>
void gemm(const T* a, bool ta, int64_t lda, const T* b, bool tb, int64_t ldb, T* c, int64_t ldc, int64_t m,
          int64_t n, int64_t k, bool accumulate) {
  if (m == 0 || n == 0) return;
  at::Tensor A = ta ? view2d(a, k, m, lda).t() : view2d(a, m, k, lda);
  at::Tensor B = tb ? view2d(b, n, k, ldb).t() : view2d(b, k, n, ldb);
  at::Tensor Cm = view2d(c, m, n, ldc);
  if (accumulate)
    at::addmm_out(Cm, Cm, A, B);
  else
    at::mm_out(Cm, A, B);
}

// x[i] <- exp(x[i] - shift), returns the sum
template <typename T>
M2_ALWAYS_INLINE T exp_shift_sum(T* x, int64_t n, T shift) {
  int64_t i = 0;
  T sum = 0;
  if constexpr (std::is_same_v<T, float>) {
    using namespace vec;
    v16 acc = splat<v16>(0.0f);
    for (; i + 16 <= n; i += 16) {
      const v16 e = vec::exp<v16, v16i>(load<v16>(x + i) - shift);
      store(x + i, e);
      acc += e;
    }
    sum = hsum(acc);
  }
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

template <typename T>
struct ReadinArgs {
  const T* x;     // [B, V, Din]
  const T* s_k;   // [U, Din]
  const T* s_v;   // [U, Din]
  const T* tk;    // [B, U·H, Din]
  T* a;           // [B, U·H, Din]  forward: written; backward: read
  T* mp;          // [B, U·H, Din]  A ⊙ s_v
  T* lse;         // [B, U·H]
  // backward only
  const T* g;     // [B, U·H, Din]  dL/d(A ⊙ s_v)
  T* dtk;         // [B, U·H, Din]
  T* dx;          // [B, V, Din]
  T* dsk_acc;     // [threads, U, Din]
  T* dsv_acc;     // [threads, U, Din]
  int64_t U, H, V, Din;
  T scale;
};

// rows [r0, r0 + rows) of batch element b: Q' block = Tk ⊙ s_k · scale
template <typename T>
M2_ALWAYS_INLINE void fold_queries(const ReadinArgs<T>& a, const T* tk, int64_t r0, int64_t rows, T* qf) {
  const int64_t Din = a.Din;
  for (int64_t r = 0; r < rows; ++r) {
    const T* sk = a.s_k + ((r0 + r) / a.H) * Din;
    const T* t = tk + r * Din;
    T* o = qf + r * Din;
#pragma omp simd
    for (int64_t d = 0; d < Din; ++d) o[d] = t[d] * sk[d] * a.scale;
  }
}

template <typename T>
M2_ALWAYS_INLINE void readin_fwd_body(const ReadinArgs<T>& a, int64_t b0, int64_t b1) {
  const int64_t R = a.U * a.H, V = a.V, Din = a.Din;
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(R, kReadinBlockElems / std::max<int64_t>(V, 1)));
  std::vector<T> qf(static_cast<size_t>(block * Din)), s(static_cast<size_t>(block * V));
  for (int64_t b = b0; b < b1; ++b) {
    const T* xb = a.x + b * V * Din;
    for (int64_t r0 = 0; r0 < R; r0 += block) {
      const int64_t rows = std::min(block, R - r0);
      const int64_t off = b * R + r0;
      fold_queries(a, a.tk + off * Din, r0, rows, qf.data());
      gemm(qf.data(), false, Din, xb, true, Din, s.data(), V, rows, V, Din, false);  // S = Q' xᵀ
      for (int64_t r = 0; r < rows; ++r) {
        T* sr = s.data() + r * V;
        T mx = -std::numeric_limits<T>::infinity();
        for (int64_t v = 0; v < V; ++v) mx = sr[v] > mx ? sr[v] : mx;
        const T sum = exp_shift_sum(sr, V, mx);
        const T inv = T(1) / sum;
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) sr[v] *= inv;
        a.lse[off + r] = mx + std::log(sum);
      }
      T* ab = a.a + off * Din;
      gemm(s.data(), false, V, xb, false, Din, ab, Din, rows, Din, V, false);  // A = P x
      T* mp = a.mp + off * Din;
      for (int64_t r = 0; r < rows; ++r) {
        const T* sv = a.s_v + ((r0 + r) / a.H) * Din;
#pragma omp simd
        for (int64_t d = 0; d < Din; ++d) mp[r * Din + d] = ab[r * Din + d] * sv[d];
      }
    }
  }
}
M2_MULTIVERSION(readin_fwd, (const ReadinArgs<scalar_t>& a, int64_t b0, int64_t b1), (a, b0, b1))

// Backward of one block of rows, in three GEMMs over stacked operands:
//   Y = [dA; Q']                    [2·rows, Din]   (dA = G ⊙ s_v)
//   Z = Y xᵀ = [dP; S]              [2·rows, V]     → rewritten in place as [P; dS]
//   dx (+)= Zᵀ Y = Pᵀ dA + dSᵀ Q'   [V, Din]        (K = 2·rows: one pass over dx)
//   dQ' = dS x                      [rows, Din]
template <typename T>
M2_ALWAYS_INLINE void readin_bwd_body(const ReadinArgs<T>& a, int64_t b0, int64_t b1) {
  const int64_t R = a.U * a.H, V = a.V, Din = a.Din, H = a.H;
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(R, kReadinBlockElems / std::max<int64_t>(V, 1)));
  std::vector<T> y(static_cast<size_t>(2 * block * Din)), z(static_cast<size_t>(2 * block * V)),
      dq(static_cast<size_t>(block * Din));
  T* dsk = a.dsk_acc + at::get_thread_num() * a.U * Din;
  T* dsv = a.dsv_acc + at::get_thread_num() * a.U * Din;
  for (int64_t b = b0; b < b1; ++b) {
    const T* xb = a.x + b * V * Din;
    T* dxb = a.dx + b * V * Din;
    for (int64_t r0 = 0; r0 < R; r0 += block) {
      const int64_t rows = std::min(block, R - r0);
      const int64_t off = b * R + r0;
      const T* ab = a.a + off * Din;
      const T* gb = a.g + off * Din;
      T* mp = a.mp + off * Din;
      T* da = y.data();
      T* qf = y.data() + rows * Din;
      // A ⊙ s_v (for dW_v), ds_v += G ⊙ A, dA = G ⊙ s_v
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t u = (r0 + r) / H;
        const T* sv = a.s_v + u * Din;
        T* dsvu = dsv + u * Din;
        const T* ar = ab + r * Din;
        const T* gr = gb + r * Din;
        T* mr = mp + r * Din;
        T* dar = da + r * Din;
#pragma omp simd
        for (int64_t d = 0; d < Din; ++d) {
          const T av = ar[d], gv = gr[d];
          mr[d] = av * sv[d];
          dsvu[d] += gv * av;
          dar[d] = gv * sv[d];
        }
      }
      fold_queries(a, a.tk + off * Din, r0, rows, qf);
      gemm(y.data(), false, Din, xb, true, Din, z.data(), V, 2 * rows, V, Din, false);  // [dP; S] = Y xᵀ
      for (int64_t r = 0; r < rows; ++r) {
        T* top = z.data() + r * V;             // dP, becomes P
        T* bottom = z.data() + (rows + r) * V;  // S, becomes dS
        exp_shift_sum(bottom, V, a.lse[off + r]);  // P = exp(S - lse)
        T D = 0;  // Σ_v P dP (= rowsum(dA ⊙ A), computed as softmax's backward does)
#pragma omp simd reduction(+ : D)
        for (int64_t v = 0; v < V; ++v) D += bottom[v] * top[v];
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) {
          const T pv = bottom[v], dpv = top[v];
          top[v] = pv;
          bottom[v] = pv * (dpv - D);
        }
      }
      gemm(z.data(), true, V, y.data(), false, Din, dxb, Din, V, Din, 2 * rows, r0 > 0);  // dx (+)= [P; dS]ᵀ [dA; Q']
      gemm(z.data() + rows * V, false, V, xb, false, Din, dq.data(), Din, rows, Din, V, false);  // dQ' = dS x
      // dTk = dQ' ⊙ s_k · scale,  ds_k += dQ' ⊙ Tk · scale
      const T* tk = a.tk + off * Din;
      T* dtk = a.dtk + off * Din;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t u = (r0 + r) / H;
        const T* sk = a.s_k + u * Din;
        T* dsku = dsk + u * Din;
        const T* dqr = dq.data() + r * Din;
        const T* tr = tk + r * Din;
        T* dtr = dtk + r * Din;
#pragma omp simd
        for (int64_t d = 0; d < Din; ++d) {
          const T g = dqr[d] * a.scale;
          dtr[d] = g * sk[d];
          dsku[d] += g * tr[d];
        }
      }
    }
  }
}
M2_MULTIVERSION(readin_bwd, (const ReadinArgs<scalar_t>& a, int64_t b0, int64_t b1), (a, b0, b1))

void check_readin(const at::Tensor& q, const at::Tensor& x, const at::Tensor& w_k, const at::Tensor& w_v,
                  const at::Tensor& s_k, const at::Tensor& s_v, const char* op) {
  TORCH_CHECK(q.dim() == 4 && x.dim() == 3 && w_k.dim() == 3 && w_v.dim() == 3 && s_k.dim() == 2 && s_v.dim() == 2, op,
              ": expected q [B,U,H,C], x [B,V,Din], w_k, w_v [H,C,Din], s_k, s_v [U,Din]");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op, ": expected float32 or float64, got ", dt);
  for (const auto* t : {&x, &w_k, &w_v, &s_k, &s_v})
    TORCH_CHECK(t->scalar_type() == dt && t->device().is_cpu(), op, ": all tensors must be CPU tensors of one dtype");
  const int64_t B = q.size(0), U = q.size(1), H = q.size(2), C = q.size(3), Din = x.size(2);
  TORCH_CHECK(x.size(0) == B, op, ": x batch differs from q's");
  TORCH_CHECK(x.size(1) > 0, op, ": x must hold at least one token (V >= 1)");
  TORCH_CHECK(w_k.size(0) == H && w_k.size(1) == C && w_k.size(2) == Din && w_v.sizes() == w_k.sizes(), op,
              ": w_k, w_v must be [H, C, Din]");
  TORCH_CHECK(s_k.size(0) == U && s_k.size(1) == Din && s_v.sizes() == s_k.sizes(), op, ": s_k, s_v must be [U, Din]");
}

// heads as the batch of a bmm: [B, U, H, n] viewed [H, B·U, n]
at::Tensor heads_view(const at::Tensor& t) {
  return t.view({t.size(0) * t.size(1), t.size(2), t.size(3)}).transpose(0, 1);
}

// the pointers and sizes both passes share; tk, a, mp, lse as the forward writes them
template <typename T>
ReadinArgs<T> readin_args(const at::Tensor& x, const at::Tensor& s_k, const at::Tensor& s_v, const at::Tensor& tk,
                          const at::Tensor& a, const at::Tensor& mp, const at::Tensor& lse, int64_t C) {
  ReadinArgs<T> args{};
  args.x = x.data_ptr<T>();
  args.s_k = s_k.data_ptr<T>();
  args.s_v = s_v.data_ptr<T>();
  args.tk = tk.data_ptr<T>();
  args.a = const_cast<T*>(a.data_ptr<T>());
  args.mp = mp.data_ptr<T>();
  args.lse = const_cast<T*>(lse.data_ptr<T>());
  args.U = tk.size(1);
  args.H = tk.size(2);
  args.V = x.size(1);
  args.Din = x.size(2);
  args.scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(C)));
  return args;
}

// fn(b0, b1) over batch elements on ATen's thread pool (the GEMMs inside then run single-threaded)
template <typename F>
void for_batch_blocks(int64_t B, const F& fn) {
  at::parallel_for(0, B, 1, [&](int64_t s, int64_t e) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads start with grad mode on
    fn(s, e);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> readin_forward(
    const at::Tensor& q_in, const at::Tensor& x_in, const at::Tensor& w_k_in, const at::Tensor& w_v_in,
    const at::Tensor& s_k_in, const at::Tensor& s_v_in, const std::optional<at::Tensor>& b_v) {
  check_readin(q_in, x_in, w_k_in, w_v_in, s_k_in, s_v_in, "readin_forward");
  auto q = q_in.contiguous(), x = x_in.contiguous(), w_k = w_k_in.contiguous(), w_v = w_v_in.contiguous();
  auto s_k = s_k_in.contiguous(), s_v = s_v_in.contiguous();
  const int64_t B = q.size(0), U = q.size(1), H = q.size(2), C = q.size(3), Din = x.size(2);
  auto opts = q.options();
  auto tk = at::empty({B, U, H, Din}, opts);
  { auto out_ = heads_view(tk); at::bmm_out(out_, heads_view(q), w_k); }
  auto a = at::empty({B, U, H, Din}, opts);
  auto mp = at::empty({B, U, H, Din}, opts);
  auto lse = at::empty({B, U, H}, opts);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "readin_forward", [&] {
    const auto args = readin_args<scalar_t>(x, s_k, s_v, tk, a, mp, lse, C);
    for_batch_blocks(B, [&](int64_t s, int64_t e) { readin_fwd<scalar_t>(args, s, e); });
  });
  auto m = at::empty({B, U, H, C}, opts);
  { auto out_ = heads_view(m); at::bmm_out(out_, heads_view(mp), w_v.transpose(1, 2)); }
  if (b_v.has_value() && b_v->defined()) m.add_(b_v->to(m.scalar_type()));
  return {m, tk, a, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> readin_backward(
    const at::Tensor& grad_m, const at::Tensor& q_in, const at::Tensor& x_in, const at::Tensor& w_k_in,
    const at::Tensor& w_v_in, const at::Tensor& s_k_in, const at::Tensor& s_v_in, const at::Tensor& tk,
    const at::Tensor& a, const at::Tensor& lse) {
  check_readin(q_in, x_in, w_k_in, w_v_in, s_k_in, s_v_in, "readin_backward");
  auto q = q_in.contiguous(), x = x_in.contiguous(), w_k = w_k_in.contiguous(), w_v = w_v_in.contiguous();
  auto s_k = s_k_in.contiguous(), s_v = s_v_in.contiguous();
  auto dm = grad_m.contiguous();
  TORCH_CHECK(dm.sizes() == q.sizes() && tk.is_contiguous() && a.is_contiguous() && lse.is_contiguous(),
              "readin_backward: saved tensors do not match");
  const int64_t B = q.size(0), U = q.size(1), H = q.size(2), C = q.size(3), V = x.size(1), Din = x.size(2);
  auto opts = q.options();
  auto db_v = dm.sum(at::IntArrayRef{0, 1});
  auto g = at::empty({B, U, H, Din}, opts);
  { auto out_ = heads_view(g); at::bmm_out(out_, heads_view(dm), w_v); }  // dL/d(A ⊙ s_v)
  auto mp = at::empty({B, U, H, Din}, opts);
  auto dtk = at::empty({B, U, H, Din}, opts);
  // the first row block of a batch element writes its dx, the others accumulate; no rows: zeros
  auto dx = U * H > 0 ? at::empty({B, V, Din}, opts) : at::zeros({B, V, Din}, opts);
  const int64_t threads = at::get_num_threads();
  auto dsk_acc = at::zeros({threads, U, Din}, opts);
  auto dsv_acc = at::zeros({threads, U, Din}, opts);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "readin_backward", [&] {
    auto args = readin_args<scalar_t>(x, s_k, s_v, tk, a, mp, lse, C);
    args.g = g.data_ptr<scalar_t>();
    args.dtk = dtk.data_ptr<scalar_t>();
    args.dx = dx.data_ptr<scalar_t>();
    args.dsk_acc = dsk_acc.data_ptr<scalar_t>();
    args.dsv_acc = dsv_acc.data_ptr<scalar_t>();
    for_batch_blocks(B, [&](int64_t s, int64_t e) { readin_bwd<scalar_t>(args, s, e); });
  });
  auto dq = at::empty({B, U, H, C}, opts);
  { auto out_ = heads_view(dq); at::bmm_out(out_, heads_view(dtk), w_k.transpose(1, 2)); }
  auto dw_k = at::bmm(heads_view(q).transpose(1, 2), heads_view(dtk));  // [H, C, Din]
  auto dw_v = at::bmm(heads_view(dm).transpose(1, 2), heads_view(mp));
  return {dq, dx, dw_k, dw_v, dsk_acc.sum(0), dsv_acc.sum(0), db_v};
}

}  // namespace
}  // namespace m2mkd

TORCH_LIBRARY_IMPL(m2mkd_fast, CPU, m) {
  m.impl("readin_cpp_fwd", &m2mkd::readin_forward);
  m.impl("readin_cpp_bwd", &m2mkd::readin_backward);
}
