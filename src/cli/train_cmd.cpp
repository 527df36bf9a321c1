// moeprune pretrain / finetune: build the model, load data, run a training phase,
// save the model (and, for fine-tuning, the router history) under output.dir.
#include <filesystem>

#include "ckpt/model_file.h"
#include "cli/commands.h"
#include "core/error.h"
#include "core/log.h"
#include "core/safetensors.h"
#include "prune/router_history.h"
#include "train/trainer.h"

namespace moeprune {
namespace {

struct PhaseData {
  Split train, val, test;
};

PhaseData phase_data(const JobConfig& cfg, const PhaseConfig& phase, const std::string& name) {
  std::shared_ptr<const Dataset> train = load_dataset(cfg, "train");
  std::shared_ptr<const Dataset> test = load_dataset(cfg, "test");
  PhaseData d{make_split(train, phase, name, "train", cfg.data.val_fraction),
              make_split(train, phase, name, "val", cfg.data.val_fraction),
              make_split(test, phase, name, "test", cfg.data.val_fraction)};
  log::info(concat(name, " data: ", train->name, " classes ", d.train.num_labels, " labels; train ", d.train.size(),
                   ", val ", d.val.size(), ", test ", d.test.size(), " examples"));
  return d;
}

LoaderOptions loader_options(const JobConfig& cfg, const World& world, int64_t batch, bool train) {
  LoaderOptions o;
  o.global_batch = batch;
  o.rank = world.rank();
  o.world = world.size();
  o.seed = cfg.seed;
  o.train = train;
  o.augment = cfg.data.augment;
  o.image_size = cfg.model.image_size;
  o.channels = cfg.model.channels;
  o.prefetch = cfg.data.prefetch;
  o.device = world.device();
  return o;
}

VisionTransformer build_model(const JobConfig& cfg, int num_labels, World& world) {
  ModelConfig mc = cfg.model;
  mc.num_classes = num_labels;
  at::manual_seed(cfg.seed);
  VisionTransformer model(mc, default_placements(mc, world.size()), world.comm(), cfg.seed);
  model->to(world.device());
  return model;
}

std::string pretrained_path(const JobConfig& cfg) { return cfg.output.dir + "/pretrained.safetensors"; }

// Training throughput against the dense GEMM rate measured now on every rank.
void report_throughput(const JobConfig& cfg, World& world, const std::string& name, double images_per_s,
                       int64_t micro_batch) {
  const double flops = 3.0 * forward_flops_per_image(cfg.model);  // forward + backward
  const int64_t rows = micro_batch / world.size() * cfg.model.tokens_per_image();
  at::Tensor rate = at::tensor({measure_gemm_gflops(rows, cfg.model.hidden, cfg.model.mlp_dim)}, at::kDouble);
  world.host_comm().all_reduce(rate, ReduceOp::Sum);
  const double achieved = images_per_s * flops / 1e9;
  log::info(concat(name, " throughput: ", static_cast<int>(images_per_s), " images/s = ", achieved,
                   " GFLOP/s (dense-equivalent), ", 100.0 * achieved / rate.item<double>(),
                   "% of the float32 GEMM rate measured now (", rate.item<double>(), " GFLOP/s over ", world.size(),
                   " ranks, [", rows, "x", cfg.model.hidden, "]x[", cfg.model.hidden, "x", cfg.model.mlp_dim, "])"));
}

void print_result(const World& world, const std::string& name, const PhaseResult& r) {
  if (world.rank() != 0) return;
  std::printf("%s: validation accuracy %.2f%% (loss %.4f), test accuracy %.2f%% (loss %.4f), %lld steps in %.0f s, "
              "%.0f images/s\n",
              name.c_str(), 100 * r.val.accuracy, r.val.loss, 100 * r.test.accuracy, r.test.loss,
              static_cast<long long>(r.steps), r.seconds, r.images_per_s);
  std::fflush(stdout);
}

}  // namespace

int cmd_pretrain(World& world, const JobConfig& cfg, bool skip_if_done) {
  require(cfg.pretrain.enabled, "pretrain: pretrain.enabled is false in the config");
  const std::string out = pretrained_path(cfg);
  if (skip_if_done) {
    // Rank 0 decides (shared or local file system alike) and tells the others.
    at::Tensor reuse = at::zeros({1}, at::kInt);
    if (world.rank() == 0 && std::filesystem::exists(out)) {
      try {
        SafetensorsFile f(out);
        auto it = f.metadata().find("pretrain_fingerprint");
        if (it != f.metadata().end() && it->second == cfg.pretrain_fingerprint) reuse[0] = 1;
      } catch (const UserError&) {
      }
    }
    world.host_comm().broadcast(reuse, 0);
    if (reuse[0].item<int>()) {
      log::info(concat("pretrain: reusing ", out, " (same seed, model, data and pretrain settings)"));
      return kExitOk;
    }
  }
  PhaseData d;
  world.agree([&] { d = phase_data(cfg, cfg.pretrain, "pretrain"); });
  VisionTransformer model = build_model(cfg, d.train.num_labels, world);
  MetricsSink metrics(cfg.output.dir + "/metrics.jsonl", world.rank() == 0);
  const int64_t micro = cfg.pretrain.batch_size / cfg.pretrain.accumulation;
  ShardedLoader train(d.train, loader_options(cfg, world, micro, true));
  ShardedLoader val(d.val, loader_options(cfg, world, cfg.data.eval_batch_size, false));
  ShardedLoader test(d.test, loader_options(cfg, world, cfg.data.eval_batch_size, false));
  Trainer trainer(world.comms(), cfg, cfg.pretrain, "pretrain", model, metrics);
  PhaseResult r = trainer.run(train, val, &test);
  report_throughput(cfg, world, "pretrain", r.images_per_s, micro);
  save_model(out, model, world.host_comm(),
             {{"format", "moeprune-model-v1"}, {"pretrain_fingerprint", cfg.pretrain_fingerprint},
              {"num_labels", std::to_string(d.train.num_labels)}, {"config", cfg.resolved_yaml}});
  log::info(concat("pretrain: saved ", out));
  print_result(world, "pretrain (source task)", r);
  return kExitOk;
}

int cmd_finetune(World& world, const JobConfig& cfg) {
  const std::string init = cfg.finetune.init.empty() ? pretrained_path(cfg) : cfg.finetune.init;
  PhaseData d;
  world.agree([&] {
    require(std::filesystem::exists(init),
            concat("finetune: initial model '", init, "' does not exist: run `moeprune pretrain` first or set "
                   "finetune.init to a model file"));
    d = phase_data(cfg, cfg.finetune, "finetune");
  });
  VisionTransformer model = build_model(cfg, d.train.num_labels, world);
  world.agree([&] { load_model(init, model, LoadOptions{/*new_head=*/true}); });
  log::info(concat("finetune: loaded ", init, " with a new zero-initialised head of ", d.train.num_labels,
                   " labels"));
  MetricsSink metrics(cfg.output.dir + "/metrics.jsonl", world.rank() == 0);
  const int64_t micro = cfg.finetune.batch_size / cfg.finetune.accumulation;
  ShardedLoader train(d.train, loader_options(cfg, world, micro, true));
  ShardedLoader val(d.val, loader_options(cfg, world, cfg.data.eval_batch_size, false));
  ShardedLoader test(d.test, loader_options(cfg, world, cfg.data.eval_batch_size, false));

  RouterHistory history;
  history.snapshot(model);
  TrainHooks hooks;
  hooks.on_step = [&](int64_t, const std::map<int, LayerStats>& s) { history.accumulate(s); };
  hooks.on_history = [&](int64_t step) {
    const HistoryRecord& rec = history.record(world.host_comm(), model, step);
    metrics.write(nlohmann::json{{"phase", "finetune"}, {"step", step},
                                 {"router_history", nlohmann::json::parse(RouterHistory::to_json(rec))}});
  };
  Trainer trainer(world.comms(), cfg, cfg.finetune, "finetune", model, metrics);
  PhaseResult r = trainer.run(train, val, &test, hooks);
  report_throughput(cfg, world, "finetune", r.images_per_s, micro);
  const std::string out = cfg.output.dir + "/finetuned.safetensors";
  save_model(out, model, world.host_comm(),
             {{"format", "moeprune-model-v1"}, {"num_labels", std::to_string(d.train.num_labels)},
              {"config", cfg.resolved_yaml}});
  if (world.rank() == 0) history.save(cfg.output.dir + "/router_history.json");
  log::info(concat("finetune: saved ", out, " and ", cfg.output.dir, "/router_history.json"));
  print_result(world, "finetune (downstream task)", r);
  if (world.rank() == 0 && !history.records().empty()) {
    const HistoryRecord& last = history.records().back();
    std::printf("router history at step %lld: per expert  ||w_ft|| - ||w_pre||  (kept tokens)\n",
                static_cast<long long>(last.step));
    for (const auto& [layer, experts] : last.layers) {
      std::printf("  layer %d:", layer);
      for (size_t e = 0; e < experts.size(); ++e)
        std::printf(" e%zu %+.3f (%lld)", e, experts[e].norm_change, static_cast<long long>(experts[e].kept));
      std::printf("\n");
    }
    std::fflush(stdout);
  }
  return kExitOk;
}

}  // namespace moeprune
