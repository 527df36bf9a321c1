// moeprune forward: the smoke test's figures on rank 0 (pipeline/forward_check.h).
#include <cstdio>

#include "cli/commands.h"
#include "pipeline/forward_check.h"

namespace moeprune {

int cmd_forward(World& world, const JobConfig& cfg) {
  const ForwardFigures f = forward_check(world, cfg);
  if (world.rank() != 0) return kExitOk;
  std::printf("moeprune forward: %s, %d rank(s), device %s\n", f.model_name.c_str(), f.ranks, f.device.c_str());
  for (const auto& line : f.expert_rows) std::printf("expert rows %s\n", line.c_str());
  std::printf("loss              %.4e\n", f.loss);
  std::printf("output sum|x|     %.4e\n", f.out_abs);
  std::printf("output sum x^2    %.4e\n", f.out_sq);
  std::printf("dense grad sum|g| %.4e\n", f.dense_grad_abs);
  std::printf("dense grad sum g^2 %.4e\n", f.dense_grad_sq);
  std::printf("expert grad sum|g| %.4e\n", f.expert_grad_abs);
  std::printf("expert grad sum g^2 %.4e\n", f.expert_grad_sq);
  std::fflush(stdout);
  return kExitOk;
}

}  // namespace moeprune
