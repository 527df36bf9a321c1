// moeprune run: the whole job in one mpirun. Each phase records itself in the
// checkpoint manifest (finished_phases), so `--resume auto` continues where the
// job stopped: inside a training phase at its step, or at the next phase.
#include <algorithm>
#include <chrono>

#include "ckpt/checkpoint.h"
#include "cli/commands.h"
#include "core/error.h"
#include "core/log.h"

namespace moeprune {

int cmd_run(World& world, const JobConfig& cfg, const std::string& resume) {
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::string> phases;
  if (cfg.pretrain.enabled) phases.push_back("pretrain");
  phases.push_back("finetune");
  phases.push_back("prune");
  if (cfg.refinetune.enabled) phases.push_back("refinetune");

  size_t first = 0;
  const bool auto_resume = resume == "auto";
  if (auto_resume) {
    std::string dir;
    Manifest m;
    world.agree([&] {
      dir = latest_checkpoint(checkpoint_dir(cfg));
      if (!dir.empty()) m = read_manifest(dir);
    });
    if (!dir.empty()) {
      const auto it = std::find(phases.begin(), phases.end(), m.state.phase);
      require(it != phases.end(), concat("run --resume auto: the latest checkpoint ", dir, " is of phase '",
                                         m.state.phase, "', which this config does not run"));
      const bool done = std::find(m.state.finished_phases.begin(), m.state.finished_phases.end(), m.state.phase) !=
                        m.state.finished_phases.end();
      first = static_cast<size_t>(it - phases.begin()) + (done ? 1 : 0);
      log::info(concat("run: latest checkpoint ", dir, " (phase ", m.state.phase, done ? ", finished" : "",
                       ", step ", m.state.step, "); continuing with ",
                       first < phases.size() ? phases[first] : std::string("nothing: the job is complete")));
    } else {
      log::info("run: no checkpoint yet; starting from the beginning");
    }
  } else {
    require(resume.empty() || resume == "none", concat("run --resume '", resume, "': expected auto or none"));
  }
  const std::string phase_resume = auto_resume ? "auto" : "none";
  for (size_t i = first; i < phases.size(); ++i) {
    const std::string& p = phases[i];
    log::info(concat("run: phase ", i + 1, "/", phases.size(), ": ", p));
    int rc = kExitOk;
    if (p == "pretrain") rc = cmd_pretrain(world, cfg, /*skip_if_done=*/true, phase_resume);
    else if (p == "finetune") rc = cmd_finetune(world, cfg, phase_resume);
    else if (p == "prune") rc = cmd_prune(world, cfg, "", /*in_pipeline=*/true);
    else rc = cmd_refinetune(world, cfg, phase_resume);
    if (rc != kExitOk) return rc;
  }
  log::info(concat("run: done in ", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                   " s; report ", cfg.output.dir, "/prune_report.json, checkpoints ", checkpoint_dir(cfg)));
  return kExitOk;
}

}  // namespace moeprune
