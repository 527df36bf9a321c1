#include "core/phase.h"

#include "core/error.h"

namespace moeprune {

const std::vector<PhaseInfo>& phase_table() {
  static const std::vector<PhaseInfo> table{
      {Phase::Pretrain, "pretrain", &JobConfig::pretrain, "randomly initialised weights",
       "pretrained.safetensors (reused while seed, model, data and pretrain settings are unchanged)", 1},
      {Phase::Finetune, "finetune", &JobConfig::finetune,
       "the pretrained model (finetune.init) with a new zero-initialised head",
       "finetuned.safetensors, router_history.json, a fine-tuning checkpoint", 2},
      {Phase::Prune, "prune", nullptr, "the fine-tuning checkpoint (weights, optimiser state, router history)",
       "prune_report.json, a pruned checkpoint", 4},
      {Phase::Refinetune, "refinetune", &JobConfig::refinetune, "the pruned model, with a new optimiser",
       "the re-fine-tuned checkpoint; results added to prune_report.json", 3},
  };
  return table;
}

const PhaseInfo& phase_info(Phase p) { return phase_table().at(static_cast<size_t>(p)); }

std::string_view phase_name(Phase p) { return phase_info(p).name; }

Phase parse_phase(const std::string& text, const std::string& what) {
  std::string expected;
  for (const PhaseInfo& i : phase_table()) {
    if (i.name == text) return i.phase;
    expected += concat(expected.empty() ? "" : ", ", i.name);
  }
  throw UserError(concat(what, "='", text, "', expected one of ", expected));
}

bool is_training(Phase p) { return phase_info(p).section != nullptr; }

const PhaseConfig& phase_config(const JobConfig& cfg, Phase p) {
  const PhaseInfo& i = phase_info(p);
  require(i.section != nullptr, concat("phase ", i.name, " has no training settings"));
  return cfg.*(i.section);
}

std::vector<Phase> job_phases(const JobConfig& cfg) {
  std::vector<Phase> out;
  if (cfg.pretrain.enabled) out.push_back(Phase::Pretrain);
  out.push_back(Phase::Finetune);
  out.push_back(Phase::Prune);
  if (cfg.refinetune.enabled) out.push_back(Phase::Refinetune);
  return out;
}

}  // namespace moeprune
