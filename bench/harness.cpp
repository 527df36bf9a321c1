#include "harness.h"

#include <torch/csrc/autograd/profiler_kineto.h>
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

void profile_to(World& world, const std::string& path, int reps, const std::function<void()>& f) {
  if (path.empty()) return;
  namespace pi = torch::profiler::impl;
  namespace ap = torch::autograd::profiler;
  const std::string file = world.size() > 1 ? path + ".rank" + std::to_string(world.rank()) : path;
  const pi::ProfilerConfig cfg(pi::ProfilerState::KINETO, /*report_input_shapes=*/true);
  std::set<pi::ActivityType> acts{pi::ActivityType::CPU};
  if (world.device().is_cuda()) acts.insert(pi::ActivityType::CUDA);
  sync_device(world);
  ap::prepareProfiler(cfg, acts);
  ap::enableProfiler(cfg, acts);
  for (int i = 0; i < reps; ++i) f();
  sync_device(world);
  ap::disableProfiler()->save(file);
  if (world.rank() == 0) std::printf("profile of %d run(s): %s\n", reps, file.c_str());
}

}  // namespace moeprune::bench
