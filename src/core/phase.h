// The phases of a job, as types. One table holds what each phase is: its name
// (subcommand, checkpoint records, metrics), its config section, what it starts
// from and what it leaves behind, and the salt that separates its router-noise
// seeds from other phases'. Everything else asks the table instead of comparing
// strings.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/config.h"

namespace moeprune {

enum class Phase { Pretrain, Finetune, Prune, Refinetune };

struct PhaseInfo {
  Phase phase;
  std::string_view name;  // also the config section holding the phase's settings
  // The training settings (section of the same name); nullptr for prune, whose
  // settings are JobConfig::prune.
  PhaseConfig JobConfig::*section;
  std::string_view input;   // what the phase starts from
  std::string_view output;  // what it leaves under output.dir and checkpoint.dir
  uint64_t seed_salt;       // mixed into the phase's router-noise seeds
};

// Every phase in job order.
const std::vector<PhaseInfo>& phase_table();
const PhaseInfo& phase_info(Phase p);
std::string_view phase_name(Phase p);
inline std::string str(Phase p) { return std::string(phase_name(p)); }
// UserError "<what>='text', expected one of pretrain, finetune, prune, refinetune".
Phase parse_phase(const std::string& text, const std::string& what);
// Training phases have a PhaseConfig; prune does not.
bool is_training(Phase p);
const PhaseConfig& phase_config(const JobConfig& cfg, Phase p);
// The phases `moeprune run` runs with this config, in order: pretrain when
// enabled, finetune, prune, refinetune when enabled.
std::vector<Phase> job_phases(const JobConfig& cfg);

}  // namespace moeprune
