// Shared declarations of the m2mkd_fast C++ CPU backend (m2mkd_fast._C).
//
// Every op lives in its own translation unit and registers its CPU kernels under the
// torch.library namespace `m2mkd_fast` (schemas are defined once, in module.cpp).
// Hot loops are compiled three times (AVX-512, AVX2+FMA, baseline x86-64-v2) through GCC
// target attributes and picked at run time from the CPU's features, because the extension
// itself is built for x86-64-v2 only.
//
// Environment: M2MKD_CPP_ISA=baseline|avx2|avx512 (read at import) caps the instruction
// set (never above the CPU's; m2mkd_fast._C.set_isa does the same at run time);
// M2MKD_CPP_GENERIC=1 (read per call) makes graph attention skip its head-dim-specialised float32 kernels
// (both only for testing and debugging).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

namespace m2mkd {

// Instruction-set level the dispatched kernels use.
enum class Isa : int { Baseline = 0, Avx2 = 1, Avx512 = 2 };

// Best level this CPU supports, lowered by set_isa_limit (tests use it to run every path).
Isa active_isa();
Isa detected_isa();
void set_isa_limit(int level);  // 0 baseline, 1 AVX2, 2 AVX-512; -1 resets to the detected level
std::string isa_name(Isa isa);

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define M2_HAVE_MULTIVERSION 1
#define M2_ALWAYS_INLINE inline __attribute__((always_inline))
#define M2_TARGET_AVX2 __attribute__((target("avx2,fma,bmi2")))
#define M2_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi2")))
#else
#define M2_HAVE_MULTIVERSION 0
#define M2_ALWAYS_INLINE inline
#define M2_TARGET_AVX2
#define M2_TARGET_AVX512
#endif

// Declares a kernel `name` with the three ISA variants `name##_avx512`, `name##_avx2`,
// `name##_base`, each inlining the template body `name##_body<scalar_t>(args...)`.
// Lambdas are NOT compiled with the caller's target attribute, so parallel_for lambdas call
// the dispatched function rather than holding the hot loop themselves.
#define M2_MULTIVERSION(name, params, args)                                                   \
  template <typename scalar_t>                                                                \
  M2_TARGET_AVX512 void name##_avx512 params { name##_body<scalar_t> args; }                  \
  template <typename scalar_t>                                                                \
  M2_TARGET_AVX2 void name##_avx2 params { name##_body<scalar_t> args; }                      \
  template <typename scalar_t>                                                                \
  void name##_base params { name##_body<scalar_t> args; }                                     \
  template <typename scalar_t>                                                                \
  inline void name params {                                                                   \
    switch (::m2mkd::active_isa()) {                                                          \
      case ::m2mkd::Isa::Avx512: name##_avx512<scalar_t> args; break;                         \
      case ::m2mkd::Isa::Avx2: name##_avx2<scalar_t> args; break;                             \
      default: name##_base<scalar_t> args; break;                                             \
    }                                                                                         \
  }

// Philox4x32-10 exactly as Triton's tl.rand (triton/language/random.py): key = (seed low
// 32 bits, seed high 32 bits), counter = (offset, 0, 0, 0), first output word, int32
// bitcast, (x < 0 ? -x - 1 : x) * 4.6566127342e-10f.
M2_ALWAYS_INLINE float philox_rand(uint64_t seed, uint32_t offset) {
  uint32_t c0 = offset, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  for (int r = 0; r < 10; ++r) {
    const uint32_t a0 = c0, a2 = c2;
    const uint64_t pb = static_cast<uint64_t>(kRoundB) * a2;
    const uint64_t pa = static_cast<uint64_t>(kRoundA) * a0;
    c0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    k0 += kKeyA;
    k1 += kKeyB;
  }
  int32_t x = static_cast<int32_t>(c0);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// ---------------------------------------------------------------------------------------------
// Portable fixed-width float vectors (GCC vector extensions): 16 lanes lower to one zmm under
// AVX-512, two ymm under AVX2, four xmm on the baseline; only used inside always-inline code.
namespace vec {
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

template <typename V>
M2_ALWAYS_INLINE V load(const float* p) {
  V r;
  __builtin_memcpy(&r, p, sizeof(V));
  return r;
}
template <typename V>
M2_ALWAYS_INLINE void store(float* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}
template <typename V>
M2_ALWAYS_INLINE V splat(float x) {
  return V{} + x;
}

// horizontal sum of one vector
M2_ALWAYS_INLINE float hsum(v16 a) {
  v8 h = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// the horizontal sums of four vectors, as one v4 {sum a, sum b, sum c, sum d}
M2_ALWAYS_INLINE v4 hsum4(v16 a, v16 b, v16 c, v16 d) {
  v8 a8 = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
  v8 b8 = __builtin_shufflevector(b, b, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(b, b, 8, 9, 10, 11, 12, 13, 14, 15);
  v8 c8 = __builtin_shufflevector(c, c, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(c, c, 8, 9, 10, 11, 12, 13, 14, 15);
  v8 d8 = __builtin_shufflevector(d, d, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(d, d, 8, 9, 10, 11, 12, 13, 14, 15);
  v8 ab = __builtin_shufflevector(a8, b8, 0, 1, 2, 3, 8, 9, 10, 11) + __builtin_shufflevector(a8, b8, 4, 5, 6, 7, 12, 13, 14, 15);
  v8 cd = __builtin_shufflevector(c8, d8, 0, 1, 2, 3, 8, 9, 10, 11) + __builtin_shufflevector(c8, d8, 4, 5, 6, 7, 12, 13, 14, 15);
  // lanes: a a c c b b d d
  v8 x = __builtin_shufflevector(ab, cd, 0, 1, 8, 9, 4, 5, 12, 13) + __builtin_shufflevector(ab, cd, 2, 3, 10, 11, 6, 7, 14, 15);
  v4 y = __builtin_shufflevector(x, x, 0, 2, 4, 6) + __builtin_shufflevector(x, x, 1, 3, 5, 7);  // a c b d
  return __builtin_shufflevector(y, y, 0, 2, 1, 3);
}

// exp(x) in float32 (Cephes expf polynomial, ~1 ulp); exactly 0 for x < -87 (incl. -inf).
template <typename V, typename VI>
M2_ALWAYS_INLINE V exp(V x) {
  const auto tiny = x < -87.0f;
  x = x > 88.0f ? splat<V>(88.0f) : x;
  x = tiny ? splat<V>(0.0f) : x;
  const V magic = splat<V>(12582912.0f);  // 1.5 * 2**23: adding it rounds to an integer
  const V t = x * 1.44269504088896341f + magic;
  const VI n = (VI)t - 0x4B400000;
  const V fn = t - magic;
  V r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  V y = splat<V>(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  V out = (V)((VI)y + (n << 23));
  return tiny ? splat<V>(0.0f) : out;
}

// natural log in float32 for positive normal x (Cephes logf polynomial, ~1 ulp)
template <typename V, typename VI>
M2_ALWAYS_INLINE V log(V x) {
  const VI bits = (VI)x;
  VI e = ((bits >> 23) & 0xff) - 126;
  V m = (V)((bits & 0x807fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const auto small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const V fe = __builtin_convertvector(e, V);
  const V z = m * m;
  V y = splat<V>(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += fe * -2.12194440e-4f;
  y += z * -0.5f;
  return m + y + fe * 0.693359375f;
}

// log1p(x) for x > -1 with 1 + x normal: log(u) - ((u - 1) - x) / u, u = 1 + x
template <typename V, typename VI>
M2_ALWAYS_INLINE V log1p(V x) {
  const V u = x + 1.0f;
  const V d = u - 1.0f;
  const V l = log<V, VI>(u);
  return d == 0.0f ? x : l - (d - x) / u;
}
}  // namespace vec

// Raises a c10::Error with the op name and a message when cond is false.
#define M2_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)

}  // namespace m2mkd
