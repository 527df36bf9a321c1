// moeprune-bench ckpt: sharded checkpoint save and load MB/s of a model (default
// V-MoE S/32) with SGD momentum, against a plain read+write+fsync copy of the same
// files in the same run.
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>

#include "benches.h"
#include "ckpt/manifest.h"
#include "ckpt/reader.h"
#include "ckpt/writer.h"
#include "harness.h"
#include "model/model_state.h"
#include "pipeline/job.h"
#include "train/trainer.h"

namespace moeprune::bench {
namespace fs = std::filesystem;

namespace {
// Copies every file of src into dst with read/write + fsync: the plain-copy reference.
int64_t copy_tree(const std::string& src, const std::string& dst) {
  fs::create_directories(dst);
  int64_t bytes = 0;
  std::vector<char> buf(1 << 22);
  for (const auto& e : fs::directory_iterator(src)) {
    const int in = ::open(e.path().c_str(), O_RDONLY);
    const std::string out_path = dst + "/" + e.path().filename().string();
    const int out = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ssize_t n = 0;
    while ((n = ::read(in, buf.data(), buf.size())) > 0) {
      if (::write(out, buf.data(), static_cast<size_t>(n)) != n) throw std::runtime_error("copy: write failed");
      bytes += n;
    }
    ::fsync(out);
    ::close(in);
    ::close(out);
  }
  return bytes;
}
}  // namespace

int ckpt(World& world, const Options& o) {
  const JobConfig cfg = parse_config(o.config);
  const ModelConfig& mc = cfg.model;
  VisionTransformer model = build_job_model(cfg, mc, default_placements(mc, world.size()), world);
  Optimizer opt(cfg.finetune, param_slots(model));
  for (auto& s : opt.slots()) s.m1 = at::zeros_like(s.param);  // SGD momentum: realistic size
  ModelState state(model);
  const std::string dir = o.dir, root = dir + "/ckpt";
  std::vector<double> save, load, copy;
  int64_t bytes = 0;
  for (int r = 0; r < o.reps; ++r) {
    if (world.rank() == 0) fs::remove_all(dir);
    world.host_comm().barrier();
    CheckpointWriter w(world.comms(), root, 1, false);
    Timing t = time_it(world, 1, [&] { w.save({&state, &opt}, "finetune", 0, cfg.resolved_yaml); }, 0);
    save.push_back(t.median);
    bytes = w.last_save_bytes();
    const Manifest m = read_manifest(w.last_saved());
    load.push_back(time_it(world, 1, [&] { load_checkpoint(m, {&state, &opt}); }, 0).median);
    copy.push_back(time_it(world, 1, [&] { if (world.rank() == 0) copy_tree(w.last_saved(), dir + "/copy"); }, 0).median);
  }
  const Timing ts = summarize(world, save), tl = summarize(world, load), tc = summarize(world, copy);
  if (world.rank() == 0) {
    const double mb = static_cast<double>(bytes) / 1e6;
    std::printf("checkpoint benchmark: %s, %d rank(s), %.1f MB (parameters + SGD momentum), median of %d\n",
                mc.name.c_str(), world.size(), mb, o.reps);
    std::printf("  %-28s %10s %10s %12s %8s\n", "operation", "seconds", "MB/s", "vs copy", "spread");
    for (auto [name, t] : {std::pair{"plain copy (read+write+fsync)", tc}, std::pair{"save (incl. fsync, CRC)", ts},
                           std::pair{"load (incl. CRC check)", tl}})
      std::printf("  %-28s %10.3f %10.1f %11.2fx %7.0f%%\n", name, t.median, mb / t.median, tc.median / t.median,
                  100 * t.spread());
    fs::remove_all(dir);
  }
  const double mb = static_cast<double>(bytes) / 1e6;
  nlohmann::json row = {{"model", mc.name}, {"bytes", bytes}, {"save_mb_s", mb / ts.median},
                        {"load_mb_s", mb / tl.median}, {"copy_mb_s", mb / tc.median},
                        {"save_vs_copy", tc.median / ts.median}, {"load_vs_copy", tc.median / tl.median}};
  row.update(timing_json("save", ts));
  row.update(timing_json("load", tl));
  json_row(world, "ckpt", row);
  return 0;
}

}  // namespace moeprune::bench
