// Entry points of moeprune's subcommands, called by main.cpp after the config is
// parsed and validated on every rank.
#pragma once
#include "core/config.h"
#include "dist/world.h"

namespace moeprune {

// Builds the model with the config's seed, runs one forward and backward pass on
// a fixed synthetic global batch and prints per-rank expert rows, the loss and
// checksums of outputs and gradients (identical for any world size).
int cmd_forward(World& world, const JobConfig& cfg);

}  // namespace moeprune
