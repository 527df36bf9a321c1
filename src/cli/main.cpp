// moeprune command line: parses the subcommand and config on every rank, agrees
// across ranks that the input is valid, then runs the subcommand.
#include <CLI/CLI.hpp>

#include <cstdio>

#include "cli/commands.h"
#include "core/error.h"
#include "core/log.h"
#include "model/expert_bank.h"
#include "model/fused_dispatch.h"

using namespace moeprune;

int main(int argc, char** argv) {
  std::unique_ptr<World> world;
  try {
    world = std::make_unique<World>(&argc, &argv, "auto");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moeprune: cannot start: %s\n", e.what());
    return kExitUserError;
  }

  CLI::App app{
      "moeprune: expert-parallel fine-tuning, router-based expert pruning and rebalancing of V-MoE / E3-MoE\n"
      "models over MPI (CPU) and NCCL (GPU). Launch with mpirun; every rank runs the same command.\n"
      "Without --config the embedded default (configs/vmoe-tiny.yaml) is used."};
  app.require_subcommand(1);
  app.fallthrough();  // global options may follow the subcommand
  std::string config_path;
  std::vector<std::string> overrides;
  bool verbose = false;
  app.add_option("-c,--config", config_path, "YAML job config (default: embedded vmoe-tiny)");
  app.add_option("--set", overrides, "Override a config key, e.g. --set model.moe.top_k=1 (repeatable)");
  app.add_flag("-v,--verbose", verbose, "Debug logging on rank 0");

  auto* fwd = app.add_subcommand(
      "forward",
      "Smoke test of the expert-parallel model: build it with the config's seed, run one forward and\n"
      "backward pass on a fixed synthetic batch, print per-expert rows, the loss and checksums of outputs\n"
      "and gradients. The figures are the same for any number of ranks.\n"
      "Example: mpirun -np 4 build/moeprune forward --config configs/vmoe-tiny.yaml");

  bool skip_if_done = false;
  auto* pre = app.add_subcommand(
      "pretrain",
      "Train the source task (config section `pretrain`) from scratch on every rank and save\n"
      "<output.dir>/pretrained.safetensors. Metrics go to <output.dir>/metrics.jsonl.\n"
      "Example: launch/mpirun.sh -np 2 build/moeprune pretrain --config configs/vmoe-tiny.yaml");
  std::string resume;
  pre->add_option("--resume", resume, "auto (latest checkpoint of this phase, if any) | DIR | none");
  pre->add_flag("--skip-if-done", skip_if_done,
                "Reuse an existing pretrained model made with the same seed, model, data and pretrain settings");
  auto* fin = app.add_subcommand(
      "finetune",
      "Fine-tune the pretrained model (or finetune.init) on the downstream task (section `finetune`)\n"
      "with a new zero-initialised head, recording each expert's router-weight change and load.\n"
      "Writes <output.dir>/finetuned.safetensors and <output.dir>/router_history.json.\n"
      "Checkpoints every checkpoint.every steps and on SIGTERM/SIGUSR1 (then exit code 75).\n"
      "Example: launch/mpirun.sh -np 2 build/moeprune finetune --set finetune.steps=200 --resume auto");
  fin->add_option("--resume", resume, "auto (latest checkpoint of this phase, if any) | DIR | none");
  auto* run = app.add_subcommand(
      "run",
      "The whole job in one mpirun: pretrain (when configured and not already done with the same\n"
      "settings) -> fine-tune recording router history -> calibrate -> prune -> rebalance ->\n"
      "re-fine-tune (when refinetune.enabled) -> evaluate, with sharded checkpoints throughout.\n"
      "After preemption (exit code 75) rerun the same command with --resume auto, on any number of ranks.\n"
      "Example: launch/mpirun.sh -np 2 build/moeprune run --config configs/vmoe-tiny.yaml --resume auto");
  run->add_option("--resume", resume, "auto (continue at the phase and step of the latest checkpoint) | none");
  auto* ref = app.add_subcommand(
      "refinetune",
      "Re-fine-tune the pruned model of the latest `prune` checkpoint (section refinetune: SEER-MoE\n"
      "stage 2 with router_entropy_weight; evaluation with prune.eval_top_k).");
  ref->add_option("--resume", resume, "auto | DIR | none");
  std::string prune_from;
  auto* prn = app.add_subcommand(
      "prune",
      "Prune a fine-tuned model: load its sharded checkpoint (any number of ranks), calibrate, score\n"
      "every expert by prune.criterion, prune globally or per layer, re-place the survivors for even\n"
      "load, evaluate, optionally re-fine-tune (section `refinetune`), and write a pruned checkpoint\n"
      "and <output.dir>/prune_report.json.\n"
      "Example: launch/mpirun.sh -np 2 build/moeprune prune --set prune.ratio=0.5 --from runs/vmoe-tiny/checkpoints");
  prn->add_option("--from", prune_from, "fine-tuning checkpoint or checkpoint root (default: checkpoint.dir)");
  std::string ckpt_action, ckpt_dir, ckpt_out;
  auto* ck = app.add_subcommand(
      "ckpt",
      "Sharded checkpoints (one process, no mpirun needed):\n"
      "  inspect DIR       phase, step, world size, experts per layer and their ranks, file sizes\n"
      "  verify DIR        sizes and CRC-32 of every file against the manifest\n"
      "  export DIR OUT    every tensor in one safetensors file (experts stacked per layer)\n"
      "DIR may be a checkpoint or a checkpoint root (its latest checkpoint).\n"
      "Example: build/moeprune ckpt inspect runs/vmoe-tiny/checkpoints");
  ck->add_option("action", ckpt_action, "inspect | verify | export")
      ->required()
      ->check(CLI::IsMember({"inspect", "verify", "export"}));
  ck->add_option("dir", ckpt_dir, "checkpoint directory or root")->required();
  ck->add_option("out", ckpt_out, "output file (export)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // Every rank parses the same arguments: each exits the same way, no collective pending.
    if (world->rank() == 0) {
      const int rc = app.exit(e);
      return rc == 0 ? kExitOk : kExitUserError;
    }
    return e.get_exit_code() == 0 ? kExitOk : kExitUserError;
  }
  log::init(world->rank(), world->size(), verbose);
  if (*ck) {
    if (world->rank() != 0) return kExitOk;
    try {
      return cmd_ckpt(ckpt_action, ckpt_dir, ckpt_out);
    } catch (const UserError& e) {
      log::error(e.what());
      return kExitUserError;
    }
  }

  // Parse and validate on every rank, then agree: an error anywhere ends every
  // rank with exit code 2 and the message on each rank that saw it.
  JobConfig cfg;
  std::string error;
  try {
    cfg = parse_config(config_path, overrides);
    validate_world(cfg, world->size());
    kernel_mode();  // MOEPRUNE_KERNELS and MOEPRUNE_EXPERT_GEMM are checked here, not in the first forward pass
    expert_gemm();
  } catch (const UserError& e) {
    error = e.what();
  }
  if (!world->all_ok(error.empty())) {
    log::error(error.empty() ? std::string("another rank rejected the input") : error);
    return kExitUserError;
  }
  world->set_threads();
  install_stop_signals();

  return run_ranks(*world, [&](World& w) {
    if (*fwd) return cmd_forward(w, cfg);
    if (*pre) return cmd_pretrain(w, cfg, skip_if_done, resume);
    if (*fin) return cmd_finetune(w, cfg, resume);
    if (*prn) return cmd_prune(w, cfg, prune_from);
    if (*run) return cmd_run(w, cfg, resume);
    if (*ref) return cmd_refinetune(w, cfg, resume);
    return kExitOk;
  });
}
