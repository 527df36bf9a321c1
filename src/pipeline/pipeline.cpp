#include "pipeline/pipeline.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>

#include "ckpt/manifest.h"
#include "ckpt/store.h"
#include "core/error.h"
#include "core/log.h"
#include "core/safetensors.h"
#include "pipeline/phases.h"

namespace moeprune {
namespace {

// One job per output directory: rank 0 holds an advisory lock (flock) on
// <output.dir>/.moeprune.lock for the job's life. A second job gets a one-line error
// naming the directory and the holder; the kernel drops the lock of a job that died,
// so a stale lock file is simply taken over.
class OutputLock {
 public:
  OutputLock(World& world, const std::string& dir) {
    world.agree([&] {
      if (world.rank() != 0) return;
      std::error_code ec;
      std::filesystem::create_directories(dir, ec);
      require(!ec, concat("output.dir '", dir, "': cannot create it (", ec.message(), ")"));
      const std::string path = dir + "/.moeprune.lock";
      fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
      require(fd_ >= 0, concat("output.dir '", dir, "': cannot write in it (", std::strerror(errno), ")"));
      if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
        std::string holder;
        std::getline(std::ifstream(path), holder);
        ::close(fd_);
        fd_ = -1;
        throw UserError(concat("output.dir '", dir, "' is in use by another moeprune job (",
                               holder.empty() ? std::string("holder unknown") : holder,
                               "): give this job another output.dir, or wait for that job to end"));
      }
      char host[256] = {0};
      ::gethostname(host, sizeof(host) - 1);
      const std::time_t now = std::time(nullptr);
      char when[32] = {0};
      std::strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S UTC", std::gmtime(&now));
      const std::string who = concat("pid ", ::getpid(), " on ", host, " since ", when, "\n");
      if (::ftruncate(fd_, 0) == 0) {
        [[maybe_unused]] const auto n = ::write(fd_, who.data(), who.size());
      }
    });
  }
  ~OutputLock() {
    if (fd_ >= 0) ::close(fd_);  // releases the lock
  }
  OutputLock(const OutputLock&) = delete;
  OutputLock& operator=(const OutputLock&) = delete;

 private:
  int fd_ = -1;
};

// Rank 0 decides whether output.dir/pretrained.safetensors was made with the same
// settings (shared or local file system alike) and tells the others.
bool pretrained_is_current(World& world, const JobConfig& cfg) {
  at::Tensor reuse = at::zeros({1}, at::kInt);
  if (world.rank() == 0 && std::filesystem::exists(pretrained_path(cfg))) {
    try {
      SafetensorsFile f(pretrained_path(cfg));
      auto it = f.metadata().find("pretrain_fingerprint");
      if (it != f.metadata().end() && it->second == cfg.pretrain_fingerprint) reuse[0] = 1;
    } catch (const UserError&) {
    }
  }
  world.host_comm().broadcast(reuse, 0);
  return reuse[0].item<int>() != 0;
}

int run_phases(World& world, const JobConfig& cfg, const std::vector<Phase>& phases, size_t first,
               const RunOptions& opts, bool numbered) {
  Carry carry;
  for (size_t i = first; i < phases.size(); ++i) {
    const Phase p = phases[i];
    if (numbered) log::info(concat("run: phase ", i + 1, "/", phases.size(), ": ", phase_name(p)));
    int rc = kExitOk;
    if (p == Phase::Pretrain) {
      require(cfg.pretrain.enabled, concat(phase_name(p), ": pretrain.enabled is false in the config"));
      if (opts.reuse_pretrained && pretrained_is_current(world, cfg)) {
        log::info(concat(phase_name(p), ": reusing ", pretrained_path(cfg),
                         " (same seed, model, data and pretrain settings)"));
        continue;
      }
    }
    if (p == Phase::Prune) rc = run_prune_phase(world, cfg, opts, carry);
    else rc = run_training_phase(world, cfg, p, opts, carry);
    if (rc != kExitOk) return rc;
  }
  return kExitOk;
}

}  // namespace

int Pipeline::run(const std::vector<Phase>& phases, const RunOptions& opts) {
  OutputLock lock(world_, cfg_.output.dir);
  return run_phases(world_, cfg_, phases, 0, opts, /*numbered=*/false);
}

int Pipeline::run_job(const std::string& resume) {
  const auto t0 = std::chrono::steady_clock::now();
  OutputLock lock(world_, cfg_.output.dir);
  const std::vector<Phase> phases = job_phases(cfg_);
  size_t first = 0;
  const bool auto_resume = resume == "auto";
  if (auto_resume) {
    std::string dir;
    Manifest m;
    world_.agree([&] {
      dir = latest_checkpoint(checkpoint_dir(cfg_));
      if (!dir.empty()) m = read_manifest(dir);
    });
    if (!dir.empty()) {
      Phase saved{};
      bool done = false;
      world_.agree([&] {
        saved = parse_phase(m.phase, concat("checkpoint ", dir, ": phase"));
        done = JobProgress::from_meta(m.section("progress"), dir).is_finished(saved);
        require(std::find(phases.begin(), phases.end(), saved) != phases.end(),
                concat("run --resume auto: the latest checkpoint ", dir, " is of phase '", m.phase,
                       "', which this config does not run"));
      });
      first = static_cast<size_t>(std::find(phases.begin(), phases.end(), saved) - phases.begin()) + (done ? 1 : 0);
      log::info(concat("run: latest checkpoint ", dir, " (phase ", m.phase, done ? ", finished" : "", ", step ",
                       m.step, "); continuing with ",
                       first < phases.size() ? str(phases[first]) : std::string("nothing: the job is complete")));
    } else {
      log::info("run: no checkpoint yet; starting from the beginning");
    }
  } else {
    require(resume.empty() || resume == "none", concat("run --resume '", resume, "': expected auto or none"));
  }
  RunOptions opts;
  opts.resume = auto_resume ? "auto" : "none";
  opts.reuse_pretrained = true;
  const int rc = run_phases(world_, cfg_, phases, first, opts, /*numbered=*/true);
  if (rc != kExitOk) return rc;
  log::info(concat("run: done in ", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                   " s; report ", report_path(cfg_), ", checkpoints ", checkpoint_dir(cfg_)));
  return kExitOk;
}

}  // namespace moeprune
