// Job metrics: one JSON object per line in <output.dir>/metrics.jsonl (rank 0
// writes), a progress bar with rate and ETA on rank 0 when stderr is a terminal,
// and resource figures (peak resident memory, dense GEMM rate).
#pragma once
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

namespace moeprune {

class MetricsSink {
 public:
  MetricsSink() = default;  // disabled: write() is a no-op
  // Appends to path (creating parent directories) when enabled (rank 0).
  MetricsSink(const std::string& path, bool enabled);
  ~MetricsSink();
  MetricsSink(const MetricsSink&) = delete;
  MetricsSink& operator=(const MetricsSink&) = delete;
  void write(const nlohmann::json& record);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  FILE* f_ = nullptr;
};

// A one-line progress bar on a terminal; silent otherwise (periodic log lines then).
class Progress {
 public:
  Progress(std::string label, int64_t total, bool enabled);
  void update(int64_t done, const std::string& extra);
  void finish();

 private:
  std::string label_;
  int64_t total_;
  bool enabled_;
  std::chrono::steady_clock::time_point start_;
};

// Peak resident set size of this process, MiB.
double peak_rss_mib();
// Measured float32 GEMM rate of this process now, GFLOP/s ([m,k] x [k,n] products,
// the shapes of the model's expert and dense MLP products).
double measure_gemm_gflops(int64_t m, int64_t k, int64_t n, double seconds = 0.5);

}  // namespace moeprune
