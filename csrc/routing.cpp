// Top-k expert routing on CPU (docs/design.md §2.1): the integer part.
//
//   route_topk(scores [T, E], k)                   -> expert [T, k]: the k largest scores of each
//                                                     row, largest first, ties to the lower index
//   route_slots(expert [T, k], priority [T] | None, num_experts, capacity, group_size)
//                                                  -> (slot [T, k], counts [E])
//
// The scores (softmax for gate "vmoe", the logits for "naive") and the weights are computed by
// the Python wrapper with the same ATen ops as the oracle, so the selection compares exactly
// the values the oracle compares and the integers are identical. Slots are filled per group,
// k-major (all first choices in token order — or in BPR order, descending priority with ties
// by token —, then all second choices, ...); a pair whose position reaches the capacity is
// dropped (slot −1). capacity < 0 means dropless.
#include <algorithm>
#include <numeric>
#include <vector>

#include "m2mkd.h"

namespace m2mkd {
namespace {

template <typename T>
void topk_rows(const T* scores, int64_t T_, int64_t E, int64_t k, int64_t* expert) {
  at::parallel_for(0, T_, 1024, [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> best(static_cast<size_t>(k));
    std::vector<double> val(static_cast<size_t>(k));
    for (int64_t t = t0; t < t1; ++t) {
      const T* row = scores + t * E;
      int64_t n = 0;  // insertion into a sorted list of the k best (strictly greater wins)
      for (int64_t e = 0; e < E; ++e) {
        const double s = static_cast<double>(row[e]);
        if (n == k && !(s > val[k - 1])) continue;
        int64_t pos = n < k ? n : k - 1;
        while (pos > 0 && s > val[pos - 1]) {
          if (pos < k) {
            val[pos] = val[pos - 1];
            best[pos] = best[pos - 1];
          }
          --pos;
        }
        val[pos] = s;
        best[pos] = e;
        if (n < k) ++n;
      }
      std::copy(best.begin(), best.begin() + k, expert + t * k);
    }
  });
}

at::Tensor route_topk(const at::Tensor& scores_in, int64_t k) {
  TORCH_CHECK(scores_in.dim() == 2, "route_topk: scores must be [T, E], got ", scores_in.sizes());
  const int64_t T_ = scores_in.size(0), E = scores_in.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "route_topk: k must satisfy 1 <= k <= E = ", E, ", got ", k);
  auto scores = scores_in.contiguous();
  auto expert = at::empty({T_, k}, scores.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scores.scalar_type(), "route_topk", [&] {
    topk_rows<scalar_t>(scores.data_ptr<scalar_t>(), T_, E, k, expert.data_ptr<int64_t>());
  });
  return expert;
}

template <typename P>
void assign_group(const int64_t* expert, const P* priority, int64_t t0, int64_t S, int64_t k, int64_t E,
                  int64_t capacity, int64_t* slot, int64_t* filled, std::vector<int64_t>& order) {
  order.resize(static_cast<size_t>(S));
  std::iota(order.begin(), order.end(), t0);
  if (priority) {
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return static_cast<double>(priority[a]) > static_cast<double>(priority[b]);
    });
  }
  std::fill(filled, filled + E, 0);
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t t : order) {
      const int64_t e = expert[t * k + j];
      const int64_t pos = filled[e]++;
      slot[t * k + j] = (capacity < 0 || pos < capacity) ? pos : -1;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> route_slots(const at::Tensor& expert_in, const std::optional<at::Tensor>& priority_in,
                                               int64_t num_experts, int64_t capacity, int64_t group_size) {
  TORCH_CHECK(expert_in.dim() == 2 && expert_in.scalar_type() == at::kLong, "route_slots: expert must be int64 [T, k]");
  const int64_t T_ = expert_in.size(0), k = expert_in.size(1), E = num_experts;
  TORCH_CHECK(E >= 1, "route_slots: num_experts must be >= 1");
  const int64_t S = group_size > 0 ? group_size : T_;
  TORCH_CHECK(S == 0 || T_ % S == 0, "route_slots: group_size ", group_size, " must divide T = ", T_);
  auto expert = expert_in.contiguous();
  const int64_t* ex = expert.data_ptr<int64_t>();
  for (int64_t i = 0; i < T_ * k; ++i)
    TORCH_CHECK(ex[i] >= 0 && ex[i] < E, "route_slots: expert index ", ex[i], " out of range [0, ", E, ")");
  auto slot = at::empty({T_, k}, expert.options());
  const int64_t groups = S > 0 ? T_ / S : 0;
  auto filled = at::zeros({std::max<int64_t>(groups, 1), E}, expert.options());
  at::Tensor priority;
  if (priority_in.has_value() && priority_in->defined()) {
    priority = priority_in->contiguous();
    TORCH_CHECK(priority.dim() == 1 && priority.size(0) == T_, "route_slots: priority must be [T]");
  }
  auto run = [&](auto* prio) {
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      std::vector<int64_t> order;
      for (int64_t g = g0; g < g1; ++g)
        assign_group(ex, prio, g * S, S, k, E, capacity, slot.data_ptr<int64_t>(), filled.data_ptr<int64_t>() + g * E,
                     order);
    });
  };
  if (priority.defined()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, priority.scalar_type(), "route_slots",
                                    [&] { run(priority.data_ptr<scalar_t>()); });
  } else {
    run(static_cast<const float*>(nullptr));
  }
  at::Tensor counts = capacity < 0 ? filled.sum(0) : filled.clamp_max(capacity).sum(0);
  return {slot, counts};
}

}  // namespace
}  // namespace m2mkd

TORCH_LIBRARY_IMPL(m2mkd_fast, CPU, m) {
  m.impl("routing_cpp_topk", &m2mkd::route_topk);
  m.impl("routing_cpp_slots", &m2mkd::route_slots);
}
