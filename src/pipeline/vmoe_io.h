// `moeprune ckpt import` and `moeprune ckpt export-vmoe`: vmoe checkpoints in and out.
#pragma once
#include <string>

#include "core/config.h"
#include "dist/world.h"

namespace moeprune {

// Reads the vmoe checkpoint `prefix` (architecture from it, or checked against
// cfg.model when arch_from_config), prints what it read on rank 0 and writes a
// moeprune model file. Collective. Returns the exit code.
int import_vmoe(World& world, const JobConfig& cfg, const std::string& prefix, const std::string& out,
                bool arch_from_config);
// Writes any model source (pipeline/model_source.h) as a vmoe checkpoint
// `<out_prefix>.index` + `.data-*` over num_shards files. Collective.
int export_vmoe(World& world, const JobConfig& cfg, const std::string& src, const std::string& out_prefix,
                int num_shards);

}  // namespace moeprune
