// The benchmarks of moeprune-bench, one file each; main.cpp has the command line.
// Each prints a table and one JSON line per row, against a reference measured in
// the same run. Never asserted in tests.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"
#include "dist/world.h"

namespace moeprune::bench {

struct Options {
  int reps = 5;
  std::string config;        // a job config ("" = the embedded default)
  std::string dir;           // ckpt: scratch directory ("" = a fresh temporary one)
  std::string from;          // prune: fine-tuning checkpoint or root
  std::string precision;     // moe, step: fp32 | bf16 ("" = the bench's default)
  int hidden = 0, experts = 0;  // moe: only this hidden size / expert count (0 = all)
  int top_k = 0;                // moe: only this k (0 = 1 and 2)
  int64_t tokens = 0;        // moe: only this many tokens; dispatch: tokens per rank
  bool verbose = false;      // dispatch: where the time goes
  int chunks = 0;            // moe: also time runtime.dispatch_chunks = chunks, alternating with the config's
  int per_rank = 64;         // step: images per rank
  std::string profile;       // moe, step: write a profiler trace of a few extra runs here
  std::vector<std::string> overrides;  // step: config overrides (a.b=c), e.g. parallel.expert_parallel=2
};

// Sharded checkpoint save and load MB/s against a plain copy of the same files.
int ckpt(World& world, const Options& o);
// MoE layer forward+backward against dense GEMMs doing the same expert FLOPs.
int moe(World& world, const Options& o);
// Inference images/s and expert memory before and after pruning 50%.
int prune(World& world, const Options& o);
// Dispatch + combine against a raw all-to-all of the same bytes, every backend.
int dispatch(World& world, const Options& o);
// Permute and unpermute+combine GB/s against a device copy of the same bytes.
int kernels(World& world, const Options& o);
// Training steps/s of a model at a fixed per-rank batch (weak scaling with launch/bench_scaling.sh).
int step(World& world, const Options& o);

}  // namespace moeprune::bench
