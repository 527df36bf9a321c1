// The command line: what the user asked for (Args), the subcommands' definitions
// (app.cpp) and their entry points, each a thin adapter over src/pipeline or src/ckpt.
#pragma once
#include <CLI/CLI.hpp>

#include <optional>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/phase.h"
#include "dist/world.h"

namespace moeprune {

struct Args {
  std::string config_path;
  std::vector<std::string> overrides;
  bool verbose = false;
  std::string resume, prune_from;
  bool skip_if_done = false;
  std::string ckpt_action, ckpt_dir, ckpt_out;
  int ckpt_shards = 1;
  std::string predict_init, predict_images, predict_out, predict_ensemble_out;
};

// The subcommands that ran when parsed.
struct Commands {
  CLI::App* forward = nullptr;
  CLI::App* run = nullptr;
  CLI::App* ckpt = nullptr;
  CLI::App* predict = nullptr;
  std::vector<std::pair<Phase, CLI::App*>> phases;  // one per phase: pretrain, finetune, prune, refinetune
};

// Defines the options and subcommands on app, writing into args.
Commands define_commands(CLI::App& app, Args& args);

// Builds the model with the config's seed, runs one forward and backward pass on
// a fixed synthetic global batch and prints per-rank expert rows, the loss and
// checksums of outputs and gradients (identical for any world size).
int cmd_forward(World& world, const JobConfig& cfg);
// One phase as its own command (prune followed by refinetune when enabled), or the whole job.
int cmd_phase(World& world, const JobConfig& cfg, Phase phase, const Args& args);
int cmd_run(World& world, const JobConfig& cfg, const Args& args);
// `moeprune ckpt inspect|verify|export` (single process).
int cmd_ckpt(const Args& args);
// `moeprune ckpt import|export-vmoe` (collective: any number of ranks).
bool is_collective_ckpt_action(const std::string& action);
int cmd_ckpt_vmoe(World& world, const JobConfig& cfg, const Args& args);
// `moeprune predict`.
int cmd_predict(World& world, const JobConfig& cfg, const Args& args);

}  // namespace moeprune
