// moeprune pretrain | finetune | prune | refinetune | run: the pipeline, one phase or all.
#include "cli/commands.h"
#include "pipeline/pipeline.h"

namespace moeprune {

int cmd_phase(World& world, const JobConfig& cfg, Phase phase, const Args& args) {
  RunOptions opts;
  opts.resume = args.resume;
  opts.prune_from = args.prune_from;
  opts.reuse_pretrained = args.skip_if_done;
  std::vector<Phase> phases{phase};
  // Pruning alone would leave the pruned model without its re-fine-tuning.
  if (phase == Phase::Prune && cfg.refinetune.enabled) phases.push_back(Phase::Refinetune);
  return Pipeline(world, cfg).run(phases, opts);
}

int cmd_run(World& world, const JobConfig& cfg, const Args& args) {
  return Pipeline(world, cfg).run_job(args.resume);
}

}  // namespace moeprune
