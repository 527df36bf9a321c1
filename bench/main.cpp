// moeprune-bench: the benchmarks' command line (benches.h lists them).
#include <CLI/CLI.hpp>

#include "benches.h"
#include "core/env.h"
#include "core/error.h"
#include "test_tmp.h"

using namespace moeprune;

int main(int argc, char** argv) {
  World world(&argc, &argv);
  CLI::App app{"moeprune-bench: benchmarks with numbers against same-run references (a table and one JSON line per row)"};
  app.require_subcommand(1);
  bench::Options o;
  auto reps = [&](CLI::App* c, int def) {
    c->add_option("--repeat", o.reps, "timed repetitions after one warm-up (median reported)")->default_val(def);
  };
  auto config = [&](CLI::App* c, const std::string& what) { c->add_option("--config", o.config, what); };
  auto* ck = app.add_subcommand("ckpt", "checkpoint save/load MB/s against a plain file copy of the same bytes");
  config(ck, "model config (default: configs/vmoe-s32.yaml)");
  ck->add_option("--dir", o.dir, "scratch directory shared by all ranks (default: a fresh temporary one)");
  reps(ck, 2);
  auto* moe = app.add_subcommand("moe", "MoE layer forward+backward tokens/s against dense GEMMs of the same FLOPs");
  reps(moe, 5);
  config(moe, "its runtime: section picks the dispatcher and expert GEMM (default: the embedded default)");
  moe->add_option("--precision", o.precision, "fp32 | bf16 (default: bf16 on GPUs, fp32 on CPUs)");
  moe->add_option("--hidden", o.hidden, "only this hidden size (128 or 768)");
  moe->add_option("--experts", o.experts, "only this number of experts (8 or 32)");
  moe->add_option("--tokens", o.tokens, "only this number of tokens (4096 or 16384)");
  moe->add_option("--top-k", o.top_k, "only this number of experts per token (1 or 2)");
  moe->add_option("--dispatch-chunks", o.chunks,
                  "also time the layer with runtime.dispatch_chunks = N (exchange overlapped with the experts), "
                  "alternating 3 rounds with the config's setting")
      ->check(CLI::Range(2, 4096));
  moe->add_option("--profile", o.profile, "also write a profiler trace (Chrome JSON) of 3 extra runs of each row here");
  auto* prn = app.add_subcommand("prune", "inference images/s and expert memory before and after pruning 50%");
  o.from = "runs/vmoe-tiny/checkpoints";
  prn->add_option("--from", o.from, "fine-tuning checkpoint or root (default: the demo's)");
  config(prn, "config of the checkpoint's job (default: embedded vmoe-tiny)");
  reps(prn, 5);
  auto* dsp = app.add_subcommand("dispatch", "dispatch + combine bytes/s against a raw all-to-all of the same bytes");
  reps(dsp, 5);
  dsp->add_option("--tokens", o.tokens, "tokens per rank (default 4096)")->check(CLI::PositiveNumber);
  dsp->add_option("--hidden", o.hidden, "hidden size (default 768)")->check(CLI::PositiveNumber);
  dsp->add_flag("--verbose", o.verbose, "also time plan, dispatch, combine and one block all-to-all apart");
  auto* krn = app.add_subcommand("kernels", "permute and unpermute+combine GB/s against a copy of the same bytes");
  reps(krn, 5);
  auto* stp = app.add_subcommand("step", "training step time at a fixed per-rank batch (weak scaling)");
  reps(stp, 5);
  stp->add_option("--profile", o.profile, "also write a profiler trace (Chrome JSON) of 3 extra steps here");
  stp->add_option("--per-rank-batch", o.per_rank, "images per rank per step")->check(CLI::PositiveNumber);
  stp->add_option("--set", o.overrides,
                  "config override a.b=c (repeatable): parallel.expert_parallel=N (the mesh), "
                  "parallel.grad_reduce=overlap|flat, parallel.bucket_mb=M");
  config(stp, "model config (default: the embedded tiny default)");
  stp->add_option("--precision", o.precision, "fp32 | bf16 (default: the config's finetune.precision)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return world.rank() == 0 ? app.exit(e) : 0;
  }
  return run_ranks(world, [&](World& w) {
    RuntimeConfig rt;  // defaults, with the documented MOEPRUNE_* overrides (e.g. MOEPRUNE_NODE_MEMORY=0)
    apply_env_overrides(rt);
    w.apply_runtime(rt);
    if (*moe) return bench::moe(w, o);
    if (*dsp) return bench::dispatch(w, o);
    if (*krn) return bench::kernels(w, o);
    if (*stp) return bench::step(w, o);
    if (*prn) return bench::prune(w, o);
    if (o.config.empty()) o.config = std::string(MOEPRUNE_SOURCE_DIR) + "/configs/vmoe-s32.yaml";
    if (!o.dir.empty()) return bench::ckpt(w, o);
    test::TempDir scratch("bench-ckpt", w.host_comm());
    o.dir = scratch.path();
    return bench::ckpt(w, o);
  });
}
