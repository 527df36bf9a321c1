// A training phase of the pipeline (pretrain, finetune, refinetune): where it
// starts (its own checkpoint, the previous phase in memory, or the previous
// phase's output on disk), the model, data and loaders, checkpoints every
// checkpoint.every steps and on preemption signals, and what it leaves behind.
#include <cstdio>
#include <filesystem>

#include "ckpt/manifest.h"
#include "ckpt/model_file.h"
#include "ckpt/reader.h"
#include "ckpt/store.h"
#include "ckpt/vmoe_import.h"
#include "ckpt/writer.h"
#include "core/error.h"
#include "core/log.h"
#include "model/model_state.h"
#include "pipeline/phases.h"
#include "prune/report.h"
#include "train/trainer.h"

namespace moeprune {
namespace {

// Where the phase starts: its own unfinished checkpoint (resuming), or a
// checkpoint holding its input (refinetune: the pruned model), or neither.
struct Start {
  bool resuming = false;
  bool from_checkpoint = false;
  Manifest manifest;
};

Start find_start(const JobConfig& cfg, Phase phase, const RunOptions& opts, const Carry& carry) {
  Start st;
  const std::string root = checkpoint_dir(cfg), name = str(phase);
  if (!opts.resume.empty() && opts.resume != "none") {
    const bool automatic = opts.resume == "auto";
    const std::string dir = automatic ? latest_checkpoint(root) : opts.resume;
    if (!dir.empty()) {
      st.manifest = read_manifest(dir);
      const Phase saved = parse_phase(st.manifest.phase, concat("checkpoint ", dir, ": phase"));
      const bool done = JobProgress::from_meta(st.manifest.section("progress"), dir).is_finished(saved);
      if (saved == phase && !done) {
        st.resuming = st.from_checkpoint = true;
      } else {
        require(automatic, concat("--resume ", dir, ": the checkpoint is of phase '", st.manifest.phase,
                                  done ? "' (finished)" : "'", ", this command runs '", name, "'"));
        log::info(concat(name, ": latest checkpoint ", dir, " is of phase ", st.manifest.phase,
                         done ? " (finished)" : "", "; starting ", name, " from its beginning"));
      }
    } else {
      log::info(concat(name, ": no checkpoint under ", root, "; starting from the beginning"));
    }
  }
  if (phase == Phase::Refinetune && !st.resuming && !carry.model) {
    const std::string dir = latest_checkpoint(root);
    require(!dir.empty(), concat(name, ": no checkpoint under ", root, "; run `moeprune prune` first"));
    st.manifest = read_manifest(dir);
    require(st.manifest.phase == str(Phase::Prune),
            concat(name, ": the latest checkpoint ", dir, " is of phase '", st.manifest.phase,
                   "', expected the pruned model ('", phase_name(Phase::Prune), "')"));
    st.from_checkpoint = true;
  }
  const std::string init = finetune_init(cfg);
  if (phase == Phase::Finetune && !st.resuming && !carry.model)
    require(std::filesystem::is_regular_file(init) || VmoeCheckpoint::is_prefix(init),
            concat(name, ": initial model '", init, "' does not exist (neither a model file nor a vmoe checkpoint ",
                   "prefix with '", init, ".index'): download the released checkpoint (docs/usage.md, \"Released ",
                   "V-MoE checkpoints\"), run `moeprune pretrain` first, or set ", name, ".init"));
  return st;
}

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

void print_result(const std::string& what, const PhaseResult& r) {
  std::printf("%s: validation accuracy %.2f%% (loss %.4f), test accuracy %.2f%% (loss %.4f), %lld steps in %.0f s, "
              "%.0f images/s\n",
              what.c_str(), 100 * r.val.accuracy, r.val.loss, 100 * r.test.accuracy, r.test.loss,
              static_cast<long long>(r.steps), r.seconds, r.images_per_s);
  std::fflush(stdout);
}

void print_history(const RouterHistory& history) {
  if (history.records().empty()) return;
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

}  // namespace

int run_training_phase(World& world, const JobConfig& cfg, Phase phase, const RunOptions& opts, Carry& carry) {
  const std::string name = str(phase);
  const bool fine = phase == Phase::Finetune, refine = phase == Phase::Refinetune;
  const PhaseConfig& settings = phase_config(cfg, phase);
  Start st;
  PhaseData d;
  world.agree([&] {
    st = find_start(cfg, phase, opts, carry);
    // Re-fine-tuning trains on the fine-tuning task.
    d = phase_data(cfg, refine ? cfg.finetune : settings, name);
  });
  const bool from_carry = !st.from_checkpoint && carry.model;
  VisionTransformer model{nullptr};
  if (st.from_checkpoint) {
    model = build_saved_model(cfg, st.manifest, world);
  } else if (refine) {
    model = carry.model;  // the pruned model of the phase before
  } else {
    ModelConfig mc = cfg.model;
    mc.num_classes = d.train.num_labels;
    model = build_job_model(cfg, mc, default_placements(mc, world.ep_size()), world);
  }
  MetricsSink metrics(metrics_path(cfg), world.rank() == 0);
  const int64_t micro = settings.batch_size / settings.accumulation;
  const uint64_t seed = phase_seed(cfg, settings);
  ShardedLoader train(d.train, loader_options(cfg, world, micro, true, seed));
  ShardedLoader val(d.val, loader_options(cfg, world, cfg.data.eval_batch_size, false, seed));
  ShardedLoader test(d.test, loader_options(cfg, world, cfg.data.eval_batch_size, false, seed));
  Trainer trainer(world.comms(), cfg, settings, phase, model, metrics);
  auto history = std::make_shared<RouterHistory>();
  ModelState model_state(model);
  JobProgress progress;
  // What this phase's checkpoints hold.
  std::vector<const StateOwner*> owners{&model_state, &trainer.optimizer(), &train, &progress};
  if (fine) owners.push_back(history.get());

  int64_t start = 0;
  world.agree([&] {
    if (st.resuming) {
      std::vector<StateOwner*> load{&model_state, &trainer.optimizer(), &train, &progress};
      if (fine) load.push_back(history.get());
      load_checkpoint(st.manifest, load);
      start = st.manifest.step;
      log::info(concat(name, ": resumed from ", st.manifest.dir, " (saved on ", st.manifest.world_size,
                       " ranks) at step ", start));
    } else if (refine) {
      // Weights only: the new phase has a new optimiser.
      if (st.from_checkpoint) load_checkpoint(st.manifest, {&model_state, &progress});
      else progress = carry.progress;
      log::info(concat(name, ": starting from the pruned model ",
                       st.from_checkpoint ? st.manifest.dir : carry.checkpoint));
    } else if (fine) {
      if (from_carry) {
        copy_parameters(carry.model, model, /*new_head=*/true);
        log::info(concat(name, ": starting from the pretrained model of this job with a new zero-initialised head of ",
                         d.train.num_labels, " labels"));
      } else {
        const std::string init = finetune_init(cfg);
        if (VmoeCheckpoint::is_prefix(init)) {
          // A released vmoe checkpoint: its head is dropped, the position
          // embeddings are zoomed to this resolution (vmoe's fine-tuning rules).
          const VmoeCheckpoint ck(init);
          check_vmoe_leaves(ck, model->config(), /*new_head=*/true);
          const VmoeLoadReport rep = load_vmoe(ck, model, /*new_head=*/true);
          log::info(concat(name, ": loaded vmoe checkpoint ", init, " (", ck.leaves().size(), " arrays",
                           rep.zoomed ? ", position embeddings zoomed to this resolution" : "",
                           ") with a new head of ", d.train.num_labels, " labels, bias ",
                           cfg.model.head_bias_init));
        } else {
          load_model(init, model, LoadOptions{/*new_head=*/true});
          log::info(concat(name, ": loaded ", init, " with a new zero-initialised head of ", d.train.num_labels,
                           " labels"));
        }
      }
    }
  });
  carry.model = VisionTransformer(nullptr);  // this phase's model replaces it
  if (fine && !st.resuming) {
    history->snapshot(model);
    progress.finished.clear();
    if (cfg.pretrain.enabled) progress.finish(Phase::Pretrain);
  }

  TrainHooks hooks;
  if (fine) {
    hooks.on_step = [&](int64_t, const RoutingStats& s) { history->accumulate(s); };
    hooks.on_history = [&](int64_t step) {
      const HistoryRecord& rec = history->record(world.host_comm(), model, step);
      metrics.write(nlohmann::json{{"phase", name}, {"step", step},
                                   {"router_history", nlohmann::json::parse(RouterHistory::to_json(rec))}});
    };
  }
  CheckpointWriter ckpt(world.comms(), checkpoint_dir(cfg), cfg.checkpoint.keep, cfg.checkpoint.async);
  hooks.after_step = [&](int64_t step) {
    at::Tensor sig = at::tensor({g_stop_signal.load()}, at::kInt);
    world.host_comm().all_reduce(sig, ReduceOp::Max);
    const bool stop = sig.item<int>() != 0;
    // The last step gets the phase's final checkpoint below (marked finished): a
    // periodic one of the same step would be a duplicate pushing out an older one.
    const bool last = step == settings.steps;
    const bool periodic = !last && cfg.checkpoint.every > 0 && step % cfg.checkpoint.every == 0;
    if ((stop && !last) || periodic) {
      if (stop) log::info(concat(name, ": signal ", sig.item<int>(), " at step ", step, ": saving a checkpoint"));
      ckpt.save(owners, name, step, cfg.resolved_yaml);
      if (stop) ckpt.poll(/*wait=*/true);
    } else if (cfg.checkpoint.async) {
      ckpt.poll(/*wait=*/false);
    }
    return stop;
  };
  const PhaseResult r = trainer.run(train, val, &test, hooks, start);
  ckpt.poll(/*wait=*/true);
  if (r.stopped) {
    log::info(concat(name, ": stopped at step ", r.steps, "; checkpoint ", ckpt.last_saved(),
                     ". Rerun the same command with --resume auto to continue."));
    return kExitPreempted;
  }
  // The phase's final checkpoint: what the next phase starts from in a later process.
  progress.finish(phase);
  ckpt.save(owners, name, r.steps, cfg.resolved_yaml);
  ckpt.poll(/*wait=*/true);  // an asynchronous save must be complete before the next phase reads it
  report_throughput(cfg, world, name, r.images_per_s, micro);
  carry.model = model;
  carry.checkpoint = ckpt.last_saved();
  carry.progress = progress;
  carry.optimizer.clear();
  carry.history.reset();

  if (phase == Phase::Pretrain) {
    save_model(pretrained_path(cfg), model, world.host_comm(),
               {{"format", "moeprune-model-v1"}, {"pretrain_fingerprint", cfg.pretrain_fingerprint},
                {"num_labels", std::to_string(d.train.num_labels)}, {"config", cfg.resolved_yaml}});
    log::info(concat(name, ": saved ", pretrained_path(cfg)));
    if (world.rank() == 0) print_result(concat(name, " (source task)"), r);
  } else if (fine) {
    save_model(finetuned_path(cfg), model, world.host_comm(),
               {{"format", "moeprune-model-v1"}, {"num_labels", std::to_string(d.train.num_labels)},
                {"config", cfg.resolved_yaml}});
    if (world.rank() == 0) history->save(history_path(cfg));
    log::info(concat(name, ": saved ", finetuned_path(cfg), " and ", history_path(cfg)));
    if (world.rank() == 0) {
      print_result(concat(name, " (downstream task)"), r);
      print_history(*history);
    }
    carry.optimizer = trainer.optimizer().slots();
    carry.history = history;
  } else {
    // SEER-MoE: also evaluate with fewer experts per token; add to the pruning report.
    RefinetuneResult res{r.test.accuracy, r.test.loss, r.steps, settings.router_entropy_weight, 0, 0, 0};
    if (cfg.prune.eval_top_k > 0) {
      const EvalResult k = evaluate(model, test, world.comms(), 0, cfg.prune.eval_top_k);
      res.eval_top_k = cfg.prune.eval_top_k;
      res.test_accuracy_eval_top_k = k.accuracy;
      res.expert_flops_per_token_eval_top_k = expert_flops_per_token(model->config(), k.load);
    }
    if (world.rank() == 0) {
      add_refinetune_to_report(report_path(cfg), res);
      print_refinetune_result(res);
    }
  }
  return kExitOk;
}

}  // namespace moeprune
