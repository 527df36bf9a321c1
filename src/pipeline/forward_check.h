// `moeprune forward`: one forward and backward pass of the expert-parallel model on
// a fixed synthetic global batch. Its figures (loss, checksums of outputs and
// gradients, rows each expert computed) are the same for any number of ranks: a
// smoke test of expert parallelism on a new machine or build.
#pragma once
#include <string>
#include <vector>

#include "core/config.h"
#include "dist/world.h"

namespace moeprune {

struct ForwardFigures {
  std::string model_name, device;
  int ranks = 1;
  std::vector<std::string> expert_rows;  // one line per MoE layer: rows per expert, grouped by rank
  double loss = 0, out_abs = 0, out_sq = 0, dense_grad_abs = 0, dense_grad_sq = 0, expert_grad_abs = 0,
         expert_grad_sq = 0;
};

// Collective: every rank gets the global figures.
ForwardFigures forward_check(World& world, const JobConfig& cfg);

}  // namespace moeprune
