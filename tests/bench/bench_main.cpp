// moeprune-bench: benchmarks that print numbers (a table and one JSON line), each
// against a reference measured in the same run. Never asserted in tests.
//   moeprune-bench ckpt [--config FILE] [--dir DIR] [--repeat N]
//     sharded checkpoint save and load MB/s against a plain copy of the same files.
#include <CLI/CLI.hpp>
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "ckpt/checkpoint.h"
#include "core/error.h"
#include "core/log.h"
#include "train/trainer.h"

using namespace moeprune;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

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

int bench_ckpt(World& world, const JobConfig& cfg, const std::string& dir, int repeat) {
  const ModelConfig& mc = cfg.model;
  at::manual_seed(cfg.seed);
  VisionTransformer model(mc, default_placements(mc, world.size()), world.comm(), cfg.seed);
  Optimizer opt(cfg.finetune, param_slots(model));
  for (auto& s : opt.slots()) s.m1 = at::zeros_like(s.param);  // SGD momentum: realistic size
  const std::string root = dir + "/ckpt";
  double save_s = 1e30, load_s = 1e30, copy_s = 1e30;
  int64_t bytes = 0;
  for (int r = 0; r < repeat; ++r) {
    if (world.rank() == 0) fs::remove_all(dir);
    world.host_comm().barrier();
    CheckpointWriter w(world.comms(), root, 1, false);
    TrainState st;
    st.phase = "finetune";
    world.host_comm().barrier();
    auto t0 = Clock::now();
    w.save(model, opt, st, cfg, nullptr);
    save_s = std::min(save_s, seconds_since(t0));
    bytes = w.last_save_bytes();
    const Manifest m = read_manifest(w.last_saved());
    world.host_comm().barrier();
    t0 = Clock::now();
    load_checkpoint(m, model, &opt, nullptr);
    world.host_comm().barrier();
    load_s = std::min(load_s, seconds_since(t0));
    t0 = Clock::now();
    if (world.rank() == 0) copy_tree(w.last_saved(), dir + "/copy");
    world.host_comm().barrier();
    copy_s = std::min(copy_s, seconds_since(t0));
  }
  if (world.rank() == 0) {
    const double mb = static_cast<double>(bytes) / 1e6;
    std::printf("checkpoint benchmark: %s, %d rank(s), %.1f MB (parameters + SGD momentum), best of %d\n",
                mc.name.c_str(), world.size(), mb, repeat);
    std::printf("  %-28s %10s %10s %12s\n", "operation", "seconds", "MB/s", "vs copy");
    std::printf("  %-28s %10.3f %10.1f %12s\n", "plain copy (read+write+fsync)", copy_s, mb / copy_s, "1.00x");
    std::printf("  %-28s %10.3f %10.1f %11.2fx\n", "save (incl. fsync, CRC)", save_s, mb / save_s, copy_s / save_s);
    std::printf("  %-28s %10.3f %10.1f %11.2fx\n", "load (incl. CRC check)", load_s, mb / load_s, copy_s / load_s);
    nlohmann::json j = {{"bench", "ckpt"},        {"model", mc.name},        {"ranks", world.size()},
                        {"bytes", bytes},         {"save_mb_s", mb / save_s}, {"load_mb_s", mb / load_s},
                        {"copy_mb_s", mb / copy_s}, {"save_vs_copy", copy_s / save_s},
                        {"load_vs_copy", copy_s / load_s}};
    std::printf("%s\n", j.dump().c_str());
    fs::remove_all(dir);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  World world(&argc, &argv, "auto");
  CLI::App app{"moeprune-bench: benchmarks with numbers against same-run references"};
  app.require_subcommand(1);
  std::string config = std::string(MOEPRUNE_SOURCE_DIR) + "/configs/vmoe-s32.yaml";
  std::string dir = "/tmp/moeprune-bench-ckpt";
  int repeat = 2;
  auto* ck = app.add_subcommand("ckpt", "checkpoint save/load MB/s against a plain file copy of the same bytes");
  ck->add_option("--config", config, "model config (default: V-MoE S/32)");
  ck->add_option("--dir", dir, "scratch directory (shared by all ranks)");
  ck->add_option("--repeat", repeat, "repetitions; the best is reported");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return world.rank() == 0 ? app.exit(e) : 0;
  }
  return run_ranks(world, [&](World& w) {
    w.set_threads();
    const JobConfig cfg = parse_config(config);
    return bench_ckpt(w, cfg, dir, repeat);
  });
}
