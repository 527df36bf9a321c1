// The environment: the one place moeprune reads it. The variables are documented
// overrides of the config's `runtime:` section (docs/usage.md), applied when the
// config is read, so a bad value is a UserError on every rank before any work:
//   MOEPRUNE_KERNELS=auto|on|off      runtime.dispatcher = auto | kernels | torch
//   MOEPRUNE_EXPERT_GEMM=auto|loop|grouped|batched  runtime.expert_gemm
//   MOEPRUNE_MALLOC_TUNE=0|1          runtime.malloc_tune; 0 also leaves LibTorch's huge pages
//                                     off (THP_MEM_ALLOC_ENABLE, set by World otherwise)
//   MOEPRUNE_NODE_MEMORY=0|1          runtime.node_memory
//   OMP_NUM_THREADS=n                 threads per rank when runtime.threads is 0
#pragma once
#include <string>
#include <vector>

#include "core/config.h"

namespace moeprune {

// The value of environment variable `name`, or "" when unset.
std::string env_value(const char* name);

// The index in `choices` of environment variable `name` (unset or empty: -1).
// Anything else is a UserError: "NAME='v': expected a, b or c".
int env_choice(const char* name, const std::vector<std::string>& choices);

// Applies the MOEPRUNE_* variables above to rt.
void apply_env_overrides(RuntimeConfig& rt);

// Torch intra-op threads of one rank: runtime.threads, else OMP_NUM_THREADS, else
// cores / ranks on this node (at least 1).
int resolve_threads(const RuntimeConfig& rt, int ranks_per_node);

}  // namespace moeprune
