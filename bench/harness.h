// The timing harness every benchmark shares (in the manner of nccl-tests): warm-up
// runs, then timed repetitions, each one started after a device sync and a barrier
// and counted as the slowest rank's time; the median is reported with its spread
// ((max - min) / median). Every result row is printed twice: a table line for
// people and one JSON line for scripts ({"bench": ..., ...}).
#pragma once
#include <chrono>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dist/world.h"

namespace moeprune::bench {

struct Timing {
  double median = 0, min = 0, max = 0;  // seconds
  int reps = 0;
  double spread() const { return median > 0 ? (max - min) / median : 0; }
};

// Waits for the device's queued work, so that host timers measure it.
void sync_device(const World& world);

// The timing of per-rank samples: each sample the slowest rank's (host collective).
Timing summarize(World& world, std::vector<double> samples);

// Collective: f run `warmup` times untimed, then `reps` times timed.
template <typename F>
Timing time_it(World& world, int reps, const F& f, int warmup = 1) {
  using Clock = std::chrono::steady_clock;
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    sync_device(world);
    world.host_comm().barrier();
    const auto t0 = Clock::now();
    f();
    sync_device(world);
    t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return summarize(world, t);
}

// Collective: the functions of fs timed in turn, `reps` rounds of one run each
// (after one untimed warm-up round), so that drifting load touches them alike.
inline std::vector<Timing> time_alternating(World& world, int reps, const std::vector<std::function<void()>>& fs) {
  using Clock = std::chrono::steady_clock;
  for (const auto& f : fs) f();
  std::vector<std::vector<double>> t(fs.size());
  for (int r = 0; r < reps; ++r)
    for (size_t i = 0; i < fs.size(); ++i) {
      sync_device(world);
      world.host_comm().barrier();
      const auto t0 = Clock::now();
      fs[i]();
      sync_device(world);
      t[i].push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
  std::vector<Timing> out;
  for (auto& v : t) out.push_back(summarize(world, std::move(v)));
  return out;
}

// With a path: runs f `reps` times under LibTorch's profiler (host ops, and CUDA
// kernels on GPUs) and writes a Chrome trace there (".rankN" appended with several
// ranks). Without one: nothing. Outside the timed runs, so that timings stay clean.
void profile_to(World& world, const std::string& path, int reps, const std::function<void()>& f);

// Rank 0: one JSON line {"bench": name, ...fields}.
void json_row(const World& world, const std::string& bench, nlohmann::json fields);
// The JSON fields of a timing under a prefix: <p>_s (median), <p>_spread.
nlohmann::json timing_json(const std::string& prefix, const Timing& t);
// "met" / "MISSED" for a row with a target, "" without one.
const char* verdict(bool has_target, bool met);

}  // namespace moeprune::bench
