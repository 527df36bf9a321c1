#include "prune/report.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/phase.h"

namespace moeprune {
using json = nlohmann::json;

namespace {

json refinetune_json(const RefinetuneResult& r) {
  json j = {{"test_accuracy", r.test_accuracy}, {"test_loss", r.test_loss}, {"steps", r.steps},
            {"router_entropy_weight", r.router_entropy_weight}};
  if (r.eval_top_k > 0) {
    j["eval_top_k"] = r.eval_top_k;
    j["test_accuracy_eval_top_k"] = r.test_accuracy_eval_top_k;
    j["expert_flops_per_token_eval_top_k"] = r.expert_flops_per_token_eval_top_k;
  }
  return j;
}

json auto_json(const PruneOutcome& o, const PruneConfig& pc) {
  if (!o.auto_ratio) return nullptr;
  const AutoRatio& a = *o.auto_ratio;
  json pts = json::array();
  for (const auto& p : a.points) pts.push_back({{"ratio", p.ratio}, {"pruned", p.pruned}, {"accuracy", p.accuracy}});
  return {{"max_accuracy_drop", a.max_accuracy_drop}, {"split", name_of(pc.calibration.split)},
          {"calibration_batches", pc.calibration.batches}, {"unpruned_accuracy", a.baseline},
          {"candidates", pts}, {"chosen", a.chosen}};
}

json report_json(const PruneReport& r) {
  const PruneOutcome& o = *r.outcome;
  const PruneConfig& pc = *r.settings;
  json layers = json::array();
  for (size_t l = 0; l < o.plan.layers.size(); ++l) {
    const LayerPlan& lp = o.plan.layers[l];
    layers.push_back({{"block", lp.block},
                      {"experts_before", lp.kept.size() + lp.pruned.size()},
                      {"experts_after", lp.kept.size()},
                      {"kept", lp.kept},
                      {"pruned", lp.pruned},
                      {"scores", lp.scores},
                      {"calibration_load", o.calibration_load.count(lp.block) ? json(o.calibration_load.at(lp.block).kept)
                                                                              : json(nullptr)},
                      {"router_norm_change", o.router_norm_change.count(lp.block)
                                                 ? json(o.router_norm_change.at(lp.block)) : json(nullptr)},
                      {"imbalance_before", o.imbalance_before[l]},
                      {"imbalance_after", o.imbalance_after[l]},
                      {"placement_after", l < o.placements.size() ? o.placements[l].expert_rank() : std::vector<int>{}},
                      // every expert's ranks, primary first (more than one: replicas)
                      {"copies_after", l < o.placements.size() ? o.placements[l].expert_ranks()
                                                                : std::vector<std::vector<int>>{}},
                      {"replicas_after", l < o.placements.size() ? o.placements[l].num_copies() -
                                                                       o.placements[l].num_experts()
                                                                 : 0}});
  }
  return {{"criterion", name_of(pc.criterion)},
          {"scope", name_of(pc.scope)},
          {"routing", name_of(pc.routing)},
          {"ratio", o.auto_ratio ? o.auto_ratio->chosen : pc.ratio},
          {"ratio_auto", auto_json(o, pc)},
          {"ranks", r.ranks},
          {"expert_parallel", r.expert_parallel},
          {"checkpoint_in", r.checkpoint_in},
          {"checkpoint_out", r.checkpoint_out},
          {"plan_hash", std::to_string(o.plan.hash())},
          {"layers", layers},
          {"bytes_moved", o.bytes_moved},
          {"params_before", o.figures_before.params},
          {"params_after", o.figures_after.params},
          {"max_rank_param_bytes_before", o.figures_before.max_rank_bytes},
          {"max_rank_param_bytes_after", o.figures_after.max_rank_bytes},
          {"expert_flops_per_token_before", o.figures_before.expert_flops_per_token},
          {"expert_flops_per_token_after", o.figures_after.expert_flops_per_token},
          {"test_accuracy_before", o.before.accuracy},
          {"test_accuracy_after", o.after.accuracy},
          {"test_accuracy_experts_zeroed", o.experts_zeroed.accuracy},
          {str(Phase::Refinetune), r.refinetune ? refinetune_json(*r.refinetune) : json(nullptr)}};
}

void write_json(const std::string& path, const json& j) {
  const auto dir = std::filesystem::path(path).parent_path();
  if (!dir.empty()) std::filesystem::create_directories(dir);
  std::ofstream out(path);
  out << j.dump(1) << "\n";
  require(out.good(), concat("prune: cannot write the report '", path, "'"));
}

}  // namespace

void write_prune_report(const std::string& path, const PruneReport& r) { write_json(path, report_json(r)); }

void add_refinetune_to_report(const std::string& path, const RefinetuneResult& r) {
  json report = json::object();
  if (std::filesystem::exists(path)) {
    try {
      report = json::parse(std::ifstream(path));
    } catch (const json::exception&) {
      report = json::object();  // unreadable: the re-fine-tuning results still get a report
    }
  }
  report[str(Phase::Refinetune)] = refinetune_json(r);
  write_json(path, report);
}

void print_prune_report(const PruneReport& r, const std::string& path) {
  const PruneOutcome& o = *r.outcome;
  const PruneConfig& pc = *r.settings;
  std::printf("\npruning report: %s, %s scope, %s routing, %d ranks%s\n", str(pc.criterion).c_str(),
              str(pc.scope).c_str(), str(pc.routing).c_str(), r.ranks,
              r.expert_parallel > 0 && r.expert_parallel != r.ranks
                  ? concat(" (", r.ranks / r.expert_parallel, " groups x ", r.expert_parallel,
                           " expert-parallel: placements below are within a group)")
                        .c_str()
                  : "");
  if (const auto& a = o.auto_ratio) {
    std::printf("  ratio auto: within %.2f pt of the unpruned %.2f%% on the %s split (masked evaluation)\n",
                a->max_accuracy_drop, 100 * a->baseline, str(pc.calibration.split).c_str());
    for (const auto& p : a->points)
      std::printf("    ratio %5.3f  %3d experts  %6.2f%%  %+6.2f pt%s\n", p.ratio, p.pruned, 100 * p.accuracy,
                  100 * (p.accuracy - a->baseline), p.ratio == a->chosen ? "  <- chosen" : "");
    if (a->chosen == 0) std::printf("    no candidate within the budget: nothing pruned\n");
  }
  std::printf("  %-6s %8s %8s  %-26s %-22s %10s %10s %8s\n", "block", "experts", "kept", "pruned ids", "kept ids",
              "imb before", "imb after", "replicas");
  for (size_t l = 0; l < o.plan.layers.size(); ++l) {
    const LayerPlan& lp = o.plan.layers[l];
    std::string pr, kp;
    for (int id : lp.pruned) pr += concat(pr.empty() ? "" : ",", id);
    for (int id : lp.kept) kp += concat(kp.empty() ? "" : ",", id);
    const int replicas = l < o.placements.size() ? o.placements[l].num_copies() - o.placements[l].num_experts() : 0;
    std::printf("  %-6d %8zu %8zu  %-26s %-22s %10.3f %10.3f %8d\n", lp.block, lp.kept.size() + lp.pruned.size(),
                lp.kept.size(), pr.c_str(), kp.c_str(), o.imbalance_before[l], o.imbalance_after[l], replicas);
  }
  const ModelFigures &b = o.figures_before, &a = o.figures_after;
  std::printf("  %-34s %14s %14s\n", "", "before", "after");
  std::printf("  %-34s %14lld %14lld\n", "parameters", static_cast<long long>(b.params),
              static_cast<long long>(a.params));
  std::printf("  %-34s %14.0f %14.0f\n", "expert FLOPs per token per layer", b.expert_flops_per_token,
              a.expert_flops_per_token);
  std::printf("  %-34s %14.2f %14.2f\n", "max parameter MiB per rank", b.max_rank_bytes / 1048576.0,
              a.max_rank_bytes / 1048576.0);
  std::printf("  %-34s %13.2f%% %13.2f%%\n", "test accuracy", 100 * o.before.accuracy, 100 * o.after.accuracy);
  std::printf("  what the experts contribute: test accuracy %.2f%% with every expert's output zeroed (%+.2f pt)\n",
              100 * o.experts_zeroed.accuracy, 100 * (o.experts_zeroed.accuracy - o.before.accuracy));
  std::printf("  expert bytes moved between ranks: %lld; report: %s; checkpoint: %s\n",
              static_cast<long long>(o.bytes_moved), path.c_str(), r.checkpoint_out.c_str());
  std::fflush(stdout);
}

void print_refinetune_result(const RefinetuneResult& r) {
  std::printf("re-fine-tuned pruned model: test accuracy %.2f%% after %lld steps", 100 * r.test_accuracy,
              static_cast<long long>(r.steps));
  if (r.eval_top_k > 0) std::printf("; with top-%d routing %.2f%%", r.eval_top_k, 100 * r.test_accuracy_eval_top_k);
  std::printf("\n");
  std::fflush(stdout);
}

}  // namespace moeprune
