#include "model/layer_stats.h"

namespace moeprune {

void LayerStats::add(const LayerStats& o) {
  if (assigned.empty()) {
    *this = o;
    return;
  }
  for (size_t e = 0; e < assigned.size(); ++e) {
    assigned[e] += o.assigned[e];
    kept[e] += o.kept[e];
    soft[e] += o.soft[e];
  }
  tokens += o.tokens;
}

void all_reduce_stats(RoutingStats& stats, Communicator& host) {
  for (auto& [layer, s] : stats) {
    const int64_t E = static_cast<int64_t>(s.assigned.size());
    at::Tensor t = at::empty({3 * E + 1}, at::kDouble);
    for (int64_t e = 0; e < E; ++e) {
      t[e] = static_cast<double>(s.assigned[e]);
      t[E + e] = static_cast<double>(s.kept[e]);
      t[2 * E + e] = s.soft[e];
    }
    t[3 * E] = static_cast<double>(s.tokens);
    host.all_reduce(t, ReduceOp::Sum);
    for (int64_t e = 0; e < E; ++e) {
      s.assigned[e] = static_cast<int64_t>(t[e].item<double>());
      s.kept[e] = static_cast<int64_t>(t[E + e].item<double>());
      s.soft[e] = t[2 * E + e].item<double>();
    }
    s.tokens = static_cast<int64_t>(t[3 * E].item<double>());
  }
}

}  // namespace moeprune
