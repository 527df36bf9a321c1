// The prune phase of the pipeline: its input is the fine-tuned model with its
// optimiser state and router history (in memory from the fine-tuning phase, or
// read from a fine-tuning checkpoint on any number of ranks); it runs prune_job
// and stores the pruned model as a checkpoint and the report.
#include <filesystem>

#include "ckpt/manifest.h"
#include "ckpt/reader.h"
#include "ckpt/store.h"
#include "ckpt/writer.h"
#include "core/error.h"
#include "core/log.h"
#include "model/model_state.h"
#include "pipeline/phases.h"
#include "prune/prune_job.h"
#include "prune/report.h"
#include "train/trainer.h"

namespace moeprune {
namespace {

std::string json_list(const std::vector<int>& v) { return v.empty() ? "all" : nlohmann::json(v).dump(); }

// The fine-tuning checkpoint at `from` (a checkpoint or a root; "" = checkpoint.dir).
Manifest finetune_checkpoint(const JobConfig& cfg, const std::string& from) {
  std::string dir = from.empty() ? checkpoint_dir(cfg) : from;
  if (!std::filesystem::exists(dir + "/manifest.json")) {
    // A root: its newest fine-tuning checkpoint (later phases may have saved since).
    std::string newest;
    for (const auto& name : complete_checkpoints(dir))
      if (checkpoint_phase(name) == str(Phase::Finetune)) newest = name;
    require(!newest.empty(), concat("prune: no fine-tuning checkpoint under '", dir, "' (expected a checkpoint ",
                                    "directory or a checkpoint root holding one; run `moeprune finetune` first)"));
    dir = dir + "/" + newest;
  }
  Manifest m = read_manifest(dir);
  require(m.phase == str(Phase::Finetune),
          concat("prune: checkpoint ", dir, " is of phase '", m.phase, "', expected a fine-tuning checkpoint"));
  // Pruning is measured on the fine-tuning task: a checkpoint fine-tuned on another
  // task would be evaluated on labels it never learnt, and reported as a result.
  const JobConfig saved = parse_config_text(m.config_yaml, concat("<config of checkpoint ", dir, ">"), {});
  const auto task = [](const JobConfig& c) {
    return concat(str(c.data.dataset), " classes ", json_list(c.finetune.classes), " label map ",
                  json_list(c.finetune.label_map), ", image size ", c.model.image_size);
  };
  require(task(saved) == task(cfg),
          concat("prune: checkpoint ", dir, " was fine-tuned on ", task(saved), "; this config's fine-tuning task is ",
                 task(cfg), ": prune with the config that fine-tuned it (the checkpoint's manifest holds it), or "
                 "fine-tune again"));
  for (const auto& l : layout_from_json(m.section("model"), dir).layers)
    require(static_cast<int>(l.experts.size()) == cfg.model.moe.num_experts,
            concat("prune: checkpoint ", dir, " is pruned already (block ", l.block, " has ", l.experts.size(),
                   " experts)"));
  return m;
}

}  // namespace

int run_prune_phase(World& world, const JobConfig& cfg, const RunOptions& opts, Carry& carry) {
  const PruneConfig& pc = cfg.prune;
  const std::string task = str(Phase::Finetune);  // pruning is measured on the fine-tuning task
  PruneInputs in;
  std::string checkpoint_in;
  JobProgress progress;
  std::shared_ptr<RouterHistory> history = carry.history;
  PhaseData d;
  Manifest m;
  const bool from_carry = carry.model && history;
  world.agree([&] {
    if (!from_carry) m = finetune_checkpoint(cfg, opts.prune_from);
    d = phase_data(cfg, cfg.finetune, task);
  });
  if (from_carry) {
    in.model = carry.model;
    in.slots = carry.optimizer;
    checkpoint_in = carry.checkpoint;
    progress = carry.progress;
    log::info(concat("prune: the fine-tuned model of this job, in memory (its checkpoint: ", checkpoint_in, ")"));
  } else {
    in.model = build_saved_model(cfg, m, world);
    Optimizer opt(cfg.finetune, param_slots(in.model));
    history = std::make_shared<RouterHistory>();
    ModelState model_state(in.model);
    world.agree([&] { load_checkpoint(m, {&model_state, &opt, history.get(), &progress}); });
    in.slots = opt.slots();
    checkpoint_in = m.dir;
    log::info(concat("prune: loaded ", m.dir, " (fine-tuned ", m.step, " steps, saved on ", m.world_size,
                     " ranks) on ", world.size(), " ranks"));
  }
  carry = Carry{};  // the inputs are in `in` now: pruning frees what it prunes
  in.history = history.get();

  const Split& calib_split = pc.calibration.split == SplitPart::Train ? d.train
                             : pc.calibration.split == SplitPart::Test ? d.test
                                                                       : d.val;
  ShardedLoader calib(calib_split, loader_options(cfg, world, cfg.data.eval_batch_size, false, cfg.seed));
  ShardedLoader test(d.test, loader_options(cfg, world, cfg.data.eval_batch_size, false, cfg.seed));
  in.calibration = &calib;
  in.test = &test;
  const PruneOutcome out = prune_job(std::move(in), cfg, world);

  // The pruned checkpoint: what re-fine-tuning starts from in a later process.
  Optimizer pruned_opt(cfg.finetune, out.pruned.slots);
  ModelState model_state(out.pruned.model);
  progress.finish(Phase::Finetune);
  progress.finish(Phase::Prune);
  CheckpointWriter ckpt(world.comms(), checkpoint_dir(cfg), cfg.checkpoint.keep, false);
  ckpt.save({&model_state, &pruned_opt, &progress}, str(Phase::Prune), 0, cfg.resolved_yaml);

  const PruneReport report{&pc, world.size(), world.ep_size(), checkpoint_in, ckpt.last_saved(), &out, std::nullopt};
  if (world.rank() == 0) {
    write_prune_report(report_path(cfg), report);
    print_prune_report(report, report_path(cfg));
  }
  carry.model = out.pruned.model;
  carry.checkpoint = ckpt.last_saved();
  carry.progress = progress;
  return kExitOk;
}

}  // namespace moeprune
