// Shared declarations of the m2mkd_fast C++ CPU backend (m2mkd_fast._C).
//
// Every op lives in its own translation unit and registers its CPU kernels under the
// torch.library namespace `m2mkd_fast_cpp` (schemas are defined once, in module.cpp).
// Hot loops are compiled three times (AVX-512, AVX2+FMA, baseline x86-64-v2) through GCC
// target attributes and picked at run time from the CPU's features, because the extension
// itself is built for x86-64-v2 only.
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

// Raises a c10::Error with the op name and a message when cond is false.
#define M2_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)

}  // namespace m2mkd
