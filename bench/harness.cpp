#include "harness.h"

#include <torch/cuda.h>

#include <algorithm>
#include <cstdio>

namespace moeprune::bench {

void sync_device(const World& world) {
  if (world.device().is_cuda()) torch::cuda::synchronize(world.device().index());
}

Timing summarize(World& world, std::vector<double> samples) {
  at::Tensor t = at::tensor(samples, at::kDouble);
  world.host_comm().all_reduce(t, ReduceOp::Max);
  std::vector<double> v(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
  std::sort(v.begin(), v.end());
  Timing out;
  out.reps = static_cast<int>(v.size());
  if (v.empty()) return out;
  out.median = v[v.size() / 2];
  out.min = v.front();
  out.max = v.back();
  return out;
}

void json_row(const World& world, const std::string& bench, nlohmann::json fields) {
  if (world.rank() != 0) return;
  nlohmann::json row = {{"bench", bench}, {"ranks", world.size()}, {"device", world.device().str()}};
  row.update(fields);
  std::printf("%s\n", row.dump().c_str());
  std::fflush(stdout);
}

nlohmann::json timing_json(const std::string& prefix, const Timing& t) {
  return {{prefix + "_s", t.median}, {prefix + "_spread", t.spread()}};
}

const char* verdict(bool has_target, bool met) { return !has_target ? "" : met ? "met" : "MISSED"; }

}  // namespace moeprune::bench
