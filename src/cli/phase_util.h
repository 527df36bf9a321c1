// Helpers shared by the training and pruning commands: a phase's data splits and
// loader options.
#pragma once
#include "data/loader.h"
#include "dist/world.h"

namespace moeprune {

struct PhaseData {
  Split train, val, test;
};

// The task's train / val / test splits of cfg.data (loads the data set).
PhaseData phase_data(const JobConfig& cfg, const PhaseConfig& phase, const std::string& name);
// seed: the phase's seed (phase_seed()).
LoaderOptions loader_options(const JobConfig& cfg, const World& world, int64_t batch, bool train,
                             uint64_t seed);

}  // namespace moeprune
