// moeprune pretrain / finetune: build the model, load data, run a training phase,
// save the model (and, for fine-tuning, the router history) under output.dir.
#include <algorithm>
#include <filesystem>
#include <fstream>

#include <atomic>
#include <csignal>

#include "ckpt/checkpoint.h"
#include "ckpt/model_file.h"
#include "cli/commands.h"
#include "cli/phase_util.h"
#include "core/error.h"
#include "core/log.h"
#include "core/safetensors.h"
#include "prune/router_history.h"
#include "train/trainer.h"

namespace moeprune {
namespace {

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

std::atomic<int> g_stop_signal{0};

namespace {

void on_signal(int sig) { g_stop_signal.store(sig); }

// One training phase with checkpoints, preemption and resume.
// name: pretrain | finetune | refinetune (the pruned model of the latest "prune" checkpoint).
int run_phase(World& world, const JobConfig& cfg, const std::string& name, const std::string& resume) {
  const bool fine = name == "finetune", refine = name == "refinetune";
  const PhaseConfig& phase = name == "pretrain" ? cfg.pretrain : fine ? cfg.finetune : cfg.refinetune;
  const std::string root = checkpoint_dir(cfg);
  const std::string init = cfg.finetune.init.empty() ? pretrained_path(cfg) : cfg.finetune.init;
  Manifest manifest;  // the checkpoint resumed from (or, re-fine-tuning, the pruned model)
  bool resuming = false;
  PhaseData d;
  world.agree([&] {
    if (!resume.empty() && resume != "none") {
      const std::string dir = resume == "auto" ? latest_checkpoint(root) : resume;
      if (!dir.empty()) {
        manifest = read_manifest(dir);
        const bool done = std::find(manifest.state.finished_phases.begin(), manifest.state.finished_phases.end(),
                                    name) != manifest.state.finished_phases.end();
        if (manifest.state.phase == name && !done) {
          resuming = true;
        } else {
          require(resume == "auto", concat("--resume ", dir, ": the checkpoint is of phase '", manifest.state.phase,
                                           done ? "' (finished)" : "'", ", this command runs '", name, "'"));
          log::info(concat(name, ": latest checkpoint ", dir, " is of phase ", manifest.state.phase,
                           done ? " (finished)" : "", "; starting ", name, " from its beginning"));
        }
      } else {
        log::info(concat(name, ": no checkpoint under ", root, "; starting from the beginning"));
      }
    }
    if (refine && !resuming) {
      const std::string dir = latest_checkpoint(root);
      require(!dir.empty(), concat("refinetune: no checkpoint under ", root, "; run `moeprune prune` first"));
      manifest = read_manifest(dir);
      require(manifest.state.phase == "prune", concat("refinetune: the latest checkpoint ", dir, " is of phase '",
                                                      manifest.state.phase, "', expected the pruned model ('prune')"));
    }
    if (fine && !resuming)
      require(std::filesystem::exists(init),
              concat("finetune: initial model '", init, "' does not exist: run `moeprune pretrain` first or set "
                     "finetune.init to a model file"));
    d = phase_data(cfg, refine ? cfg.finetune : phase, name);
  });
  VisionTransformer model{nullptr};
  if (resuming || refine) {
    at::manual_seed(cfg.seed);
    model = VisionTransformer(model_config_of(cfg.model, manifest), placements_of(manifest, world.size()),
                              world.comm(), cfg.seed);
    model->to(world.device());
  } else {
    model = build_model(cfg, d.train.num_labels, world);
  }
  MetricsSink metrics(cfg.output.dir + "/metrics.jsonl", world.rank() == 0);
  const int64_t micro = phase.batch_size / phase.accumulation;
  ShardedLoader train(d.train, loader_options(cfg, world, micro, true, phase_seed(cfg, phase)));
  ShardedLoader val(d.val, loader_options(cfg, world, cfg.data.eval_batch_size, false, phase_seed(cfg, phase)));
  ShardedLoader test(d.test, loader_options(cfg, world, cfg.data.eval_batch_size, false, phase_seed(cfg, phase)));
  Trainer trainer(world.comms(), cfg, phase, name, model, metrics);
  RouterHistory history;
  int64_t start = 0;
  world.agree([&] {
    if (resuming) {
      start = load_checkpoint(manifest, model, &trainer.optimizer(), fine ? &history : nullptr).step;
      log::info(concat(name, ": resumed from ", manifest.dir, " (saved on ", manifest.world_size, " ranks) at step ",
                       start));
    } else if (refine) {
      load_checkpoint(manifest, model, nullptr, nullptr);  // weights only: a new optimiser for the new phase
      log::info(concat("refinetune: starting from the pruned model ", manifest.dir));
    } else if (fine) {
      load_model(init, model, LoadOptions{/*new_head=*/true});
      log::info(concat("finetune: loaded ", init, " with a new zero-initialised head of ", d.train.num_labels,
                       " labels"));
    }
  });
  if (fine && !resuming) history.snapshot(model);
  std::vector<std::string> finished_before =
      (resuming || refine) ? manifest.state.finished_phases : std::vector<std::string>{};
  if (fine && !resuming && cfg.pretrain.enabled) finished_before = {"pretrain"};

  TrainHooks hooks;
  if (fine) {
    hooks.on_step = [&](int64_t, const std::map<int, LayerStats>& s) { history.accumulate(s); };
    hooks.on_history = [&](int64_t step) {
      const HistoryRecord& rec = history.record(world.host_comm(), model, step);
      metrics.write(nlohmann::json{{"phase", name}, {"step", step},
                                   {"router_history", nlohmann::json::parse(RouterHistory::to_json(rec))}});
    };
  }
  CheckpointWriter ckpt(world.comms(), root, cfg.checkpoint.keep, cfg.checkpoint.async);
  auto state_at = [&](int64_t step) {
    TrainState st;
    st.phase = name;
    st.step = step;
    std::tie(st.epoch, st.loader_step) = trainer.loader_position(train, step);
    st.finished_phases = finished_before;
    return st;
  };
  hooks.after_step = [&](int64_t step) {
    at::Tensor sig = at::tensor({g_stop_signal.load()}, at::kInt);
    world.host_comm().all_reduce(sig, ReduceOp::Max);
    const bool stop = sig.item<int>() != 0;
    const bool periodic = cfg.checkpoint.every > 0 && step % cfg.checkpoint.every == 0;
    if (stop || periodic) {
      if (stop) log::info(concat(name, ": signal ", sig.item<int>(), " at step ", step, ": saving a checkpoint"));
      ckpt.save(model, trainer.optimizer(), state_at(step), cfg, fine ? &history : nullptr);
      if (stop) ckpt.poll(/*wait=*/true);
    } else if (cfg.checkpoint.async) {
      ckpt.poll(/*wait=*/false);
    }
    return stop;
  };
  PhaseResult r = trainer.run(train, val, &test, hooks, start);
  ckpt.poll(/*wait=*/true);
  if (r.stopped) {
    log::info(concat(name, ": stopped at step ", r.steps, "; checkpoint ", ckpt.last_saved(),
                     ". Rerun the same command with --resume auto to continue."));
    return kExitPreempted;
  }
  // The phase's final checkpoint: what the next phase (or `moeprune prune`) starts from.
  TrainState final_state = state_at(r.steps);
  final_state.finished_phases.push_back(name);
  ckpt.save(model, trainer.optimizer(), final_state, cfg, fine ? &history : nullptr);
  ckpt.poll(/*wait=*/true);  // an asynchronous save must be complete before the next phase reads it
  report_throughput(cfg, world, name, r.images_per_s, micro);
  if (refine) {
    // SEER-MoE: also evaluate with fewer experts per token; add to the pruning report.
    nlohmann::json add = {{"test_accuracy", r.test.accuracy}, {"test_loss", r.test.loss}, {"steps", r.steps},
                          {"router_entropy_weight", phase.router_entropy_weight}};
    if (cfg.prune.eval_top_k > 0) {
      const EvalResult k = evaluate(model, test, world.comms(), 0, cfg.prune.eval_top_k);
      add["eval_top_k"] = cfg.prune.eval_top_k;
      add["test_accuracy_eval_top_k"] = k.accuracy;
      add["expert_flops_per_token_eval_top_k"] = expert_flops_per_token(model->config(), k.load);
    }
    if (world.rank() == 0) {
      const std::string path = cfg.output.dir + "/prune_report.json";
      nlohmann::json report = nlohmann::json::object();
      if (std::filesystem::exists(path)) report = nlohmann::json::parse(std::ifstream(path));
      report["refinetune"] = add;
      std::ofstream(path) << report.dump(1) << "\n";
      std::printf("re-fine-tuned pruned model: test accuracy %.2f%% after %lld steps", 100 * r.test.accuracy,
                  static_cast<long long>(r.steps));
      if (add.contains("eval_top_k"))
        std::printf("; with top-%d routing %.2f%%", cfg.prune.eval_top_k,
                    100 * add["test_accuracy_eval_top_k"].get<double>());
      std::printf("\n");
      std::fflush(stdout);
    }
    return kExitOk;
  }
  if (!fine) {
    save_model(pretrained_path(cfg), model, world.host_comm(),
               {{"format", "moeprune-model-v1"}, {"pretrain_fingerprint", cfg.pretrain_fingerprint},
                {"num_labels", std::to_string(d.train.num_labels)}, {"config", cfg.resolved_yaml}});
    log::info(concat("pretrain: saved ", pretrained_path(cfg)));
    print_result(world, "pretrain (source task)", r);
    return kExitOk;
  }
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

}  // namespace

void install_stop_signals() {
  std::signal(SIGTERM, on_signal);
  std::signal(SIGUSR1, on_signal);
}

int cmd_pretrain(World& world, const JobConfig& cfg, bool skip_if_done, const std::string& resume) {
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
  return run_phase(world, cfg, "pretrain", resume);
}

int cmd_finetune(World& world, const JobConfig& cfg, const std::string& resume) {
  return run_phase(world, cfg, "finetune", resume);
}

int cmd_refinetune(World& world, const JobConfig& cfg, const std::string& resume) {
  return run_phase(world, cfg, "refinetune", resume);
}

}  // namespace moeprune
