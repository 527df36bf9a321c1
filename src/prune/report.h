// The pruning report: <output.dir>/prune_report.json and the table printed at the
// end of pruning. One writer: the prune phase writes the report, a re-fine-tuning
// phase adds its results to it (in the same process or a later one).
#pragma once
#include <optional>
#include <string>

#include "prune/prune_job.h"

namespace moeprune {

// SEER-MoE stage 2: the re-fine-tuned pruned model.
struct RefinetuneResult {
  double test_accuracy = 0, test_loss = 0;
  int64_t steps = 0;
  double router_entropy_weight = 0;
  int eval_top_k = 0;  // > 0: also evaluated with this top-k
  double test_accuracy_eval_top_k = 0, expert_flops_per_token_eval_top_k = 0;
};

struct PruneReport {
  const PruneConfig* settings = nullptr;
  int ranks = 0;
  int expert_parallel = 0;  // N of the mesh (ranks per expert-parallel group); placements are over N
  std::string checkpoint_in, checkpoint_out;
  const PruneOutcome* outcome = nullptr;
  std::optional<RefinetuneResult> refinetune;
};

// Rank 0: writes path (the report as JSON).
void write_prune_report(const std::string& path, const PruneReport& r);
// Rank 0: sets the re-fine-tuning section of the report at path (creating it when absent).
void add_refinetune_to_report(const std::string& path, const RefinetuneResult& r);
// Rank 0: the report as a table on stdout.
void print_prune_report(const PruneReport& r, const std::string& path);
// Rank 0: one line of the re-fine-tuned model's results on stdout.
void print_refinetune_result(const RefinetuneResult& r);

}  // namespace moeprune
