#include "core/env.h"

#include <cstdlib>
#include <thread>

#include "core/error.h"

namespace moeprune {

std::string env_value(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

int env_choice(const char* name, const std::vector<std::string>& choices) {
  const std::string v = env_value(name);
  if (v.empty()) return -1;
  for (size_t i = 0; i < choices.size(); ++i)
    if (v == choices[i]) return static_cast<int>(i);
  std::string expected;
  for (size_t i = 0; i < choices.size(); ++i)
    expected += (i == 0 ? "" : i + 1 == choices.size() ? " or " : ", ") + choices[i];
  throw UserError(concat(name, "='", v, "': expected ", expected));
}

void apply_env_overrides(RuntimeConfig& rt) {
  // The kernels switch predates runtime.dispatcher: on = kernels, off = torch ops.
  static const DispatcherKind kernels[] = {DispatcherKind::Auto, DispatcherKind::Kernels, DispatcherKind::Torch};
  if (const int k = env_choice("MOEPRUNE_KERNELS", {"auto", "on", "off"}); k >= 0) rt.moe.dispatcher = kernels[k];
  static const ExpertGemm gemms[] = {ExpertGemm::Auto, ExpertGemm::Loop, ExpertGemm::Grouped, ExpertGemm::Batched};
  if (const int g = env_choice("MOEPRUNE_EXPERT_GEMM", {"auto", "loop", "grouped", "batched"}); g >= 0)
    rt.moe.expert_gemm = gemms[g];
  if (const int m = env_choice("MOEPRUNE_MALLOC_TUNE", {"0", "1"}); m >= 0) rt.malloc_tune = m == 1;
  if (const int m = env_choice("MOEPRUNE_NODE_MEMORY", {"0", "1"}); m >= 0) rt.node_memory = m == 1;
}

int resolve_threads(const RuntimeConfig& rt, int ranks_per_node) {
  if (rt.threads > 0) return rt.threads;
  const int omp = std::atoi(env_value("OMP_NUM_THREADS").c_str());
  if (omp > 0) return omp;
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  return std::max(1, cores / std::max(1, ranks_per_node));
}

}  // namespace moeprune
