// Entry points of moeprune's subcommands, called by main.cpp after the config is
// parsed and validated on every rank.
#pragma once
#include <string>

#include "core/config.h"
#include "dist/world.h"

namespace moeprune {

// Builds the model with the config's seed, runs one forward and backward pass on
// a fixed synthetic global batch and prints per-rank expert rows, the loss and
// checksums of outputs and gradients (identical for any world size).
int cmd_forward(World& world, const JobConfig& cfg);

// Trains the source task (pretrain section) from scratch and saves
// output.dir/pretrained.safetensors. skip_if_done: reuse that file when it was
// made from the same seed, model, data and pretrain settings.
int cmd_pretrain(World& world, const JobConfig& cfg, bool skip_if_done, const std::string& resume);

// Fine-tunes finetune.init (default: the pretrained model) on the downstream task
// with a new head, recording router history; saves output.dir/finetuned.safetensors
// and output.dir/router_history.json.
int cmd_finetune(World& world, const JobConfig& cfg, const std::string& resume);

// resume: "" or "none" (start fresh), "auto" (latest checkpoint of this phase under
// checkpoint.dir, if any), or a checkpoint directory. Both phases save checkpoints
// every checkpoint.every steps and, on SIGTERM / SIGUSR1, save one and return
// kExitPreempted on every rank.
void install_stop_signals();

// Prunes a fine-tuned checkpoint (from: a checkpoint or a root; "" = checkpoint.dir):
// calibrate, score, plan (agreed by hash), prune, rebalance, evaluate, optional
// re-fine-tune; writes a pruned checkpoint and <output.dir>/prune_report.json.
// With refinetune.enabled and not in_pipeline, re-fine-tunes afterwards.
int cmd_prune(World& world, const JobConfig& cfg, const std::string& from, bool in_pipeline = false);

// Re-fine-tunes the pruned model of the latest "prune" checkpoint (section
// refinetune; SEER-MoE stage 2) and adds the results to prune_report.json.
int cmd_refinetune(World& world, const JobConfig& cfg, const std::string& resume);

// The one-job pipeline: [pretrain] -> finetune -> prune (calibrate, plan, prune,
// rebalance, evaluate) -> [refinetune]. resume "auto" continues at the phase and
// step of the latest checkpoint, on any number of ranks.
int cmd_run(World& world, const JobConfig& cfg, const std::string& resume);

// `moeprune ckpt inspect|verify|export` (single process).
int cmd_ckpt(const std::string& action, const std::string& dir, const std::string& out);

}  // namespace moeprune
