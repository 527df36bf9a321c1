#include "train/metrics.h"

#include <ATen/ATen.h>
#include <sys/resource.h>
#include <unistd.h>

#include <filesystem>

#include "core/error.h"

namespace moeprune {

MetricsSink::MetricsSink(const std::string& path, bool enabled) : path_(path) {
  if (!enabled) return;
  const auto parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent);
  f_ = std::fopen(path.c_str(), "a");
  require(f_ != nullptr, concat("metrics: cannot append to '", path, "'"));
}

MetricsSink::~MetricsSink() {
  if (f_) std::fclose(f_);
}

void MetricsSink::write(const nlohmann::json& record) {
  if (!f_) return;
  const std::string line = record.dump() + "\n";
  std::fwrite(line.data(), 1, line.size(), f_);
  std::fflush(f_);
}

Progress::Progress(std::string label, int64_t total, bool enabled)
    : label_(std::move(label)), total_(total), enabled_(enabled && ::isatty(2)),
      start_(std::chrono::steady_clock::now()) {}

void Progress::update(int64_t done, const std::string& extra) {
  if (!enabled_) return;
  const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double frac = total_ > 0 ? static_cast<double>(done) / total_ : 1.0;
  const int width = 30, filled = static_cast<int>(frac * width);
  const double eta = done > 0 ? el * (total_ - done) / done : 0;
  std::string bar(filled, '=');
  if (filled < width) bar += '>' + std::string(width - filled - 1, ' ');
  std::fprintf(stderr, "\r%s [%s] %lld/%lld %3.0f%% %.1f step/s ETA %dm%02ds %s\033[K", label_.c_str(), bar.c_str(),
               static_cast<long long>(done), static_cast<long long>(total_), 100 * frac, el > 0 ? done / el : 0.0,
               static_cast<int>(eta) / 60, static_cast<int>(eta) % 60, extra.c_str());
  std::fflush(stderr);
}

void Progress::finish() {
  if (enabled_) std::fprintf(stderr, "\n");
}

double peak_rss_mib() {
  struct rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) / 1024.0;
}

double measure_gemm_gflops(int64_t m, int64_t k, int64_t n, double seconds) {
  at::NoGradGuard ng;
  at::Tensor a = at::randn({m, k}), b = at::randn({k, n});
  at::mm(a, b);  // warm up
  int64_t reps = 0;
  const auto t0 = std::chrono::steady_clock::now();
  double el = 0;
  while (el < seconds) {
    at::mm(a, b);
    ++reps;
    el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  return 2.0 * m * k * n * reps / el / 1e9;
}

}  // namespace moeprune
