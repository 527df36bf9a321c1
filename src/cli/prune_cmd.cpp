// moeprune prune: load a fine-tuned sharded checkpoint on any number of ranks,
// calibrate, score the experts, make and agree on a plan, prune, rebalance the
// survivors across ranks, evaluate, optionally re-fine-tune (SEER-MoE stage 2), and
// write a pruned sharded checkpoint and a report (JSON + table).
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "ckpt/checkpoint.h"
#include "cli/commands.h"
#include "cli/phase_util.h"
#include "core/error.h"
#include "core/log.h"
#include "prune/plan.h"
#include "prune/rebalance.h"
#include "prune/router_history.h"
#include "train/trainer.h"

namespace moeprune {
namespace {

using json = nlohmann::json;

// Expected tokens per expert slot of every MoE block (kept choices on the calibration set).
std::map<int, std::vector<double>> slot_loads(const std::map<int, LayerStats>& stats) {
  std::map<int, std::vector<double>> out;
  for (const auto& [block, s] : stats) out[block] = std::vector<double>(s.kept.begin(), s.kept.end());
  return out;
}

struct ModelFigures {
  int64_t params = 0;              // all parameters of the model (every expert counted once)
  int64_t max_rank_bytes = 0;      // largest parameter bytes held by one rank
  double expert_flops_per_token = 0;  // per MoE layer, averaged over layers, measured (kept choices / tokens)
  double nominal_expert_flops_per_token = 0;
};

ModelFigures figures(const VisionTransformer& model, const std::map<int, LayerStats>& load, Communicator& host,
                     int top_k) {
  ModelFigures f;
  const ModelConfig& c = model->config();
  int64_t dense = 0, local_expert = 0;
  for (const auto& item : model->named_parameters()) {
    if (!is_expert_param(item.key())) dense += item.value().numel();
    else local_expert += item.value().numel();
  }
  at::Tensor t = at::tensor({local_expert}, at::kLong);
  host.all_reduce(t, ReduceOp::Sum);
  f.params = dense + t.item<int64_t>();
  at::Tensor mx = at::tensor({(dense + local_expert) * 4}, at::kLong);
  host.all_reduce(mx, ReduceOp::Max);
  f.max_rank_bytes = mx.item<int64_t>();
  const double per_expert = 4.0 * c.hidden * c.mlp_dim;  // two GEMMs, multiply-add = 2
  f.expert_flops_per_token = expert_flops_per_token(c, load);
  f.nominal_expert_flops_per_token = per_expert * top_k;
  return f;
}

std::vector<int> current_ranks(const MoeLayerImpl& layer, const std::vector<int>& ids) {
  std::vector<int> out;
  for (int id : ids) {
    const auto& all = layer.expert_ids();
    const auto it = std::find(all.begin(), all.end(), id);
    out.push_back(it == all.end() ? -1 : layer.placement().rank_of(static_cast<int>(it - all.begin())));
  }
  return out;
}

}  // namespace

int cmd_prune(World& world, const JobConfig& cfg, const std::string& from, bool in_pipeline) {
  const PruneConfig& pc = cfg.prune;
  Comms comms = world.comms();
  Manifest m;
  PhaseData d;
  world.agree([&] {
    std::string dir = from.empty() ? checkpoint_dir(cfg) : from;
    if (!std::filesystem::exists(dir + "/manifest.json")) {
      const std::string latest = latest_checkpoint(dir);
      require(!latest.empty(), concat("prune: no checkpoint at '", dir, "' (expected a checkpoint directory or a ",
                                      "checkpoint root with a 'latest' pointer; run `moeprune finetune` first)"));
      dir = latest;
    }
    m = read_manifest(dir);
    require(m.state.phase == "finetune",
            concat("prune: checkpoint ", dir, " is of phase '", m.state.phase, "', expected a fine-tuning checkpoint"));
    for (const auto& l : m.layers)
      require(static_cast<int>(l.experts.size()) == cfg.model.moe.num_experts,
              concat("prune: checkpoint ", dir, " is pruned already (block ", l.block, " has ", l.experts.size(),
                     " experts)"));
    d = phase_data(cfg, cfg.finetune, "finetune");
  });
  const ModelConfig mc = model_config_of(cfg.model, m);
  at::manual_seed(cfg.seed);
  VisionTransformer model(mc, placements_of(m, world.size()), world.comm(), cfg.seed);
  model->to(world.device());
  Optimizer opt(cfg.finetune, param_slots(model));
  RouterHistory history;
  world.agree([&] { load_checkpoint(m, model, &opt, &history); });
  log::info(concat("prune: loaded ", m.dir, " (fine-tuned ", m.state.step, " steps, saved on ", m.world_size,
                   " ranks) on ", world.size(), " ranks"));

  Split calib_split = pc.calibration.split == "train" ? d.train : pc.calibration.split == "test" ? d.test : d.val;
  ShardedLoader calib(calib_split, loader_options(cfg, world, cfg.data.eval_batch_size, false, cfg.seed));
  ShardedLoader test(d.test, loader_options(cfg, world, cfg.data.eval_batch_size, false, cfg.seed));

  // 1. Before pruning: accuracy and calibration counts.
  const EvalResult before = evaluate(model, test, comms);
  const EvalResult cal = evaluate(model, calib, comms, pc.calibration.batches);
  require(cal.count > 0, concat("prune: the calibration split '", pc.calibration.split, "' is empty"));
  log::info(concat("prune: test accuracy before pruning ", before.accuracy, "; calibrated on ", cal.count,
                   " examples of ", calib_split.name));
  const ModelFigures fig_before = figures(model, before.load, world.host_comm(), mc.moe.top_k);

  // 2. Scores, plan, agreement.
  std::map<int, at::Tensor> current;
  std::map<int, std::vector<int>> ids;
  for (const auto& l : model->moe_layers()) {
    current[l->layer()] = layer_router_weights(*l);
    ids[l->layer()] = l->expert_ids();
  }
  const auto scores = expert_scores(pc.criterion, history.reference(), current, cal.load, ids, cfg.seed);
  PrunePlan plan;
  world.agree([&] { plan = make_plan(scores, pc, mc.moe.top_k); });
  plan_agreement(plan, world.host_comm());
  log::info(concat("prune: plan (", pc.criterion, ", ", pc.scope, ", ", pc.routing, " routing) prunes ",
                   plan.total_pruned(), " experts; agreed by all ranks (hash ", plan.hash(), ")"));

  // 3. Apply with survivors staying where they are, then measure their loads.
  std::vector<Placement> stay;
  const auto layers = model->moe_layers();
  for (size_t l = 0; l < layers.size(); ++l) {
    std::vector<int> r = current_ranks(*layers[l], plan.layers[l].kept);
    stay.push_back(Placement(r, world.size()));
  }
  Migration pruned = apply_plan(model, opt.slots(), plan, stay, comms, cfg.seed);
  model = VisionTransformer(nullptr);  // frees the pruned experts and their state
  ShardedLoader calib2(calib_split, loader_options(cfg, world, cfg.data.eval_batch_size, false, cfg.seed));
  const EvalResult cal_after = evaluate(pruned.model, calib2, comms, pc.calibration.batches);
  const auto loads_after = slot_loads(cal_after.load);

  // 4. Rebalance by the measured loads.
  std::vector<double> imb_before, imb_after;
  std::vector<Placement> balanced;
  const auto players = pruned.model->moe_layers();
  for (size_t l = 0; l < players.size(); ++l) {
    const auto& loads = loads_after.at(players[l]->layer());
    const auto& cur = players[l]->placement().expert_rank();
    imb_before.push_back(load_imbalance(loads, cur, world.size()));
    const std::vector<int> ranks = pc.rebalance ? balanced_placement(loads, cur, world.size()) : cur;
    imb_after.push_back(load_imbalance(loads, ranks, world.size()));
    balanced.push_back(Placement(ranks, world.size()));
  }
  int64_t bytes_moved = pruned.bytes_moved;
  if (pc.rebalance) {
    Migration moved = replace_experts(pruned.model, pruned.slots, balanced, comms, cfg.seed);
    bytes_moved += moved.bytes_moved;
    pruned = std::move(moved);
  }
  const EvalResult after = evaluate(pruned.model, test, comms);
  const ModelFigures fig_after = figures(pruned.model, after.load, world.host_comm(), mc.moe.top_k);
  log::info(concat("prune: test accuracy after pruning ", after.accuracy));

  // 5. Pruned checkpoint.
  Optimizer popt(cfg.finetune, pruned.slots);
  CheckpointWriter ckpt(comms, checkpoint_dir(cfg), cfg.checkpoint.keep, false);
  TrainState st;
  st.phase = "prune";
  st.finished_phases = m.state.finished_phases;
  for (const char* ph : {"finetune", "prune"})
    if (std::find(st.finished_phases.begin(), st.finished_phases.end(), ph) == st.finished_phases.end())
      st.finished_phases.push_back(ph);
  ckpt.save(pruned.model, popt, st, cfg, nullptr);

  // 7. Report.
  json layers_j = json::array();
  for (size_t l = 0; l < plan.layers.size(); ++l) {
    const LayerPlan& lp = plan.layers[l];
    layers_j.push_back({{"block", lp.block},
                        {"experts_before", lp.kept.size() + lp.pruned.size()},
                        {"experts_after", lp.kept.size()},
                        {"kept", lp.kept},
                        {"pruned", lp.pruned},
                        {"scores", lp.scores},
                        {"imbalance_before", imb_before[l]},
                        {"imbalance_after", imb_after[l]},
                        {"placement_after", players.size() > l ? balanced[l].expert_rank() : std::vector<int>{}}});
  }
  json report = {{"criterion", pc.criterion},
                 {"scope", pc.scope},
                 {"routing", pc.routing},
                 {"ratio", pc.ratio},
                 {"ranks", world.size()},
                 {"checkpoint_in", m.dir},
                 {"checkpoint_out", ckpt.last_saved()},
                 {"plan_hash", std::to_string(plan.hash())},
                 {"layers", layers_j},
                 {"bytes_moved", bytes_moved},
                 {"params_before", fig_before.params},
                 {"params_after", fig_after.params},
                 {"max_rank_param_bytes_before", fig_before.max_rank_bytes},
                 {"max_rank_param_bytes_after", fig_after.max_rank_bytes},
                 {"expert_flops_per_token_before", fig_before.expert_flops_per_token},
                 {"expert_flops_per_token_after", fig_after.expert_flops_per_token},
                 {"test_accuracy_before", before.accuracy},
                 {"test_accuracy_after", after.accuracy},
                 {"refinetune", nullptr}};
  if (world.rank() == 0) {
    std::filesystem::create_directories(cfg.output.dir);
    std::ofstream(cfg.output.dir + "/prune_report.json") << report.dump(1) << "\n";
    std::printf("\npruning report: %s, %s scope, %s routing, %d ranks\n", pc.criterion.c_str(), pc.scope.c_str(),
                pc.routing.c_str(), world.size());
    std::printf("  %-6s %8s %8s  %-26s %-22s %10s %10s\n", "block", "experts", "kept", "pruned ids", "kept ids",
                "imb before", "imb after");
    for (size_t l = 0; l < plan.layers.size(); ++l) {
      const LayerPlan& lp = plan.layers[l];
      std::string pr, kp;
      for (int id : lp.pruned) pr += concat(pr.empty() ? "" : ",", id);
      for (int id : lp.kept) kp += concat(kp.empty() ? "" : ",", id);
      std::printf("  %-6d %8zu %8zu  %-26s %-22s %10.3f %10.3f\n", lp.block, lp.kept.size() + lp.pruned.size(),
                  lp.kept.size(), pr.c_str(), kp.c_str(), imb_before[l], imb_after[l]);
    }
    std::printf("  %-34s %14s %14s\n", "", "before", "after");
    std::printf("  %-34s %14lld %14lld\n", "parameters", static_cast<long long>(fig_before.params),
                static_cast<long long>(fig_after.params));
    std::printf("  %-34s %14.0f %14.0f\n", "expert FLOPs per token per layer", fig_before.expert_flops_per_token,
                fig_after.expert_flops_per_token);
    std::printf("  %-34s %14.2f %14.2f\n", "max parameter MiB per rank", fig_before.max_rank_bytes / 1048576.0,
                fig_after.max_rank_bytes / 1048576.0);
    std::printf("  %-34s %13.2f%% %13.2f%%\n", "test accuracy", 100 * before.accuracy, 100 * after.accuracy);
    std::printf("  expert bytes moved between ranks: %lld; report: %s/prune_report.json; checkpoint: %s\n",
                static_cast<long long>(bytes_moved), cfg.output.dir.c_str(), ckpt.last_saved().c_str());
    std::fflush(stdout);
  }
  if (cfg.refinetune.enabled && !in_pipeline) return cmd_refinetune(world, cfg, "none");
  return kExitOk;
}

}  // namespace moeprune
