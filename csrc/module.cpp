// m2mkd_fast._C: the Python module and the schemas of every C++ op.
//
// The ops are registered with torch.library in the package's one namespace `m2mkd_fast`, named
// <family>_cpp_<stage> (CPU kernels in the op files; fake kernels and autograd in
// m2mkd_fast/cpp_backend/), and are called as torch.ops.m2mkd_fast.<name>. The Python custom
// ops of the other backends add to the same namespace, hence a fragment. The Python module itself only exposes build information
// and the instruction-set switch used by the tests.
#include <torch/extension.h>

#include <atomic>
#include <cstdlib>

#include "m2mkd.h"

namespace m2mkd {

namespace {
Isa detect() {
#if M2_HAVE_MULTIVERSION
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
  return Isa::Baseline;
}

int initial_level() {
  int level = static_cast<int>(detect());
  // M2MKD_CPP_ISA=baseline|avx2|avx512 lowers the level (never raises it above the CPU's).
  if (const char* env = std::getenv("M2MKD_CPP_ISA")) {
    std::string s(env);
    int want = s == "baseline" ? 0 : s == "avx2" ? 1 : s == "avx512" ? 2 : level;
    level = std::min(level, want);
  }
  return level;
}

std::atomic<int>& level_ref() {
  static std::atomic<int> level{initial_level()};
  return level;
}
}  // namespace

Isa detected_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa active_isa() { return static_cast<Isa>(level_ref().load(std::memory_order_relaxed)); }

void set_isa_limit(int level) {
  int best = static_cast<int>(detected_isa());
  level_ref().store(level < 0 ? best : std::min(level, best));
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace m2mkd

TORCH_LIBRARY_FRAGMENT(m2mkd_fast, m) {
  // graph.cpp (the shared Philox stream)
  m.def("graph_cpp_philox(int seed, Tensor offsets) -> Tensor");
  // graph.cpp
  m.def(
      "graph_cpp_sample(Tensor logit, Tensor row, Tensor col, int batch, int num_receivers, "
      "int num_senders, Tensor seed, float temperature) -> (Tensor, Tensor)");
  m.def(
      "graph_cpp_fwd(Tensor q, Tensor k, Tensor v, Tensor row_ptr, Tensor col, Tensor bias, "
      "float scale) -> (Tensor, Tensor)");
  m.def(
      "graph_cpp_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor row_ptr, Tensor col, Tensor bias, float scale, bool bias_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // readin.cpp
  m.def(
      "readin_cpp_fwd(Tensor q, Tensor x, Tensor w_k, Tensor w_v, Tensor s_k, Tensor s_v, Tensor? b_v) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "readin_cpp_bwd(Tensor grad_m, Tensor q, Tensor x, Tensor w_k, Tensor w_v, Tensor s_k, Tensor s_v, "
      "Tensor tk, Tensor a, Tensor lse) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // routing.cpp
  m.def("routing_cpp_topk(Tensor scores, int k) -> Tensor");
  m.def(
      "routing_cpp_slots(Tensor expert, Tensor? priority, int num_experts, int capacity, int group_size) "
      "-> (Tensor, Tensor)");
  // moe.cpp
  m.def(
      "moe_cpp_fwd(Tensor x, Tensor expert, Tensor slot, Tensor weight, Tensor w1, Tensor? b1, Tensor w2, "
      "Tensor? b2, str approximate, bool save) -> (Tensor, Tensor, Tensor)");
  m.def(
      "moe_cpp_bwd(Tensor grad_y, Tensor x, Tensor expert, Tensor slot, Tensor weight, Tensor w1, Tensor w2, "
      "Tensor hidden, Tensor out, str approximate, bool bias_grads) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "m2mkd_fast C++ CPU kernels; the ops are torch.ops.m2mkd_fast.<family>_cpp_*";
  m.def("detected_isa", []() { return m2mkd::isa_name(m2mkd::detected_isa()); },
        "Best instruction set this CPU offers to the kernels");
  m.def("active_isa", []() { return m2mkd::isa_name(m2mkd::active_isa()); },
        "Instruction set the kernels use now");
  m.def(
      "set_isa",
      [](const std::string& name) {
        int level = name == "baseline" ? 0 : name == "avx2" ? 1 : name == "avx512" ? 2 : name == "auto" ? -1 : -2;
        TORCH_CHECK(level != -2, "set_isa: expected 'baseline', 'avx2', 'avx512' or 'auto', got '", name, "'");
        m2mkd::set_isa_limit(level);
        return m2mkd::isa_name(m2mkd::active_isa());
      },
      "Limit the kernels to an instruction set (never above the CPU's); returns the one in use");
}
