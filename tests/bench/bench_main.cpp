// moeprune-bench: benchmarks that print numbers (a table and one JSON line), each
// against a reference measured in the same run. Never asserted in tests.
//   moeprune-bench ckpt [--config FILE] [--dir DIR] [--repeat N]
//     sharded checkpoint save and load MB/s against a plain copy of the same files.
//   moeprune-bench moe [--repeat N]
//     MoE layer forward+backward against dense GEMMs doing the same expert FLOPs.
#include <CLI/CLI.hpp>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "ckpt/checkpoint.h"
#include "prune/plan.h"
#include "prune/rebalance.h"
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

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// MoE layer forward+backward against dense GEMMs with the same expert FLOPs.
int bench_moe(World& world, int reps) {
  if (world.rank() == 0)
    std::printf("MoE layer forward+backward, %d rank(s), %d threads per rank; 'dense' = the two expert GEMMs on\n"
                "all k*tokens rows at once (same FLOPs, no routing), measured in the same run\n",
                world.size(), at::get_num_threads());
  if (world.rank() == 0)
    std::printf("  %7s %6s %4s %2s %12s %12s %10s %10s\n", "tokens", "hidden", "E", "k", "moe ms", "dense ms",
                "ratio", "Mtok/s");
  nlohmann::json all = nlohmann::json::array();
  for (int64_t tokens : {4096, 16384})
    for (int hidden : {128, 768})
      for (int E : {8, 32})
        for (int k : {1, 2}) {
          if (E < world.size()) continue;
          ModelConfig mc;
          mc.hidden = hidden;
          mc.mlp_dim = 4 * hidden;
          mc.num_heads = 1;
          mc.moe.num_experts = E;
          mc.moe.top_k = k;
          mc.moe.group_size = 1024;  // images of one token: groups of 1024 tokens
          mc.moe.capacity_factor = 1.25;
          at::manual_seed(0);
          MoeLayer layer(mc, 1, Placement::contiguous(E, world.size()), world.comm(), 0);
          const int64_t local = tokens / world.size();
          at::Tensor x = at::randn({local, 1, hidden}).requires_grad_(true);
          std::vector<double> tm, td;
          at::Tensor w1 = at::randn({hidden, 4 * hidden}).requires_grad_(true);
          at::Tensor w2 = at::randn({4 * hidden, hidden}).requires_grad_(true);
          at::Tensor xd = at::randn({local * k, hidden}).requires_grad_(true);
          for (int r = 0; r < reps + 1; ++r) {
            world.host_comm().barrier();
            auto t0 = Clock::now();
            ForwardContext ctx;
            ctx.train = true;
            ctx.total_groups = tokens / 1024;
            ctx.first_group = world.rank() * local / 1024;
            at::Tensor y = layer->forward(x, ctx);
            (y.sum() + ctx.aux_loss).backward();
            world.host_comm().barrier();
            if (r) tm.push_back(seconds_since(t0));
            t0 = Clock::now();
            at::Tensor yd = at::mm(at::gelu(at::mm(xd, w1), "tanh"), w2);
            yd.sum().backward();
            world.host_comm().barrier();
            if (r) td.push_back(seconds_since(t0));
          }
          const double m = median(tm), d = median(td);
          if (world.rank() == 0) {
            std::printf("  %7lld %6d %4d %2d %12.2f %12.2f %10.2f %10.2f\n", static_cast<long long>(tokens), hidden, E,
                        k, 1e3 * m, 1e3 * d, m / d, tokens / m / 1e6);
            all.push_back({{"tokens", tokens}, {"hidden", hidden}, {"experts", E}, {"k", k}, {"moe_s", m},
                           {"dense_s", d}, {"ratio", m / d}, {"tokens_per_s", tokens / m}});
          }
        }
  if (world.rank() == 0) std::printf("%s\n", nlohmann::json{{"bench", "moe"}, {"ranks", world.size()}, {"results", all}}.dump().c_str());
  return 0;
}

// Inference images/s and expert memory of a fine-tuned model before and after
// pruning 50% of its experts (router_norm_change, global), same run.
int bench_prune(World& world, const JobConfig& cfg, const std::string& from, int reps) {
  std::string dir = from;
  if (!fs::exists(dir + "/manifest.json")) dir = latest_checkpoint(dir);
  require(!dir.empty(), concat("bench prune: no checkpoint at '", from, "'"));
  const Manifest m = read_manifest(dir);
  const ModelConfig mc = model_config_of(cfg.model, m);
  at::manual_seed(0);
  VisionTransformer model(mc, placements_of(m, world.size()), world.comm(), 0);
  RouterHistory history;
  load_checkpoint(m, model, nullptr, &history);
  const int64_t B = cfg.data.eval_batch_size / world.size();
  at::Tensor images = at::randn({B, mc.channels, mc.image_size, mc.image_size});
  auto measure = [&](VisionTransformer& net) {
    net->eval();
    at::NoGradGuard ng;
    std::vector<double> t;
    for (int r = 0; r < reps + 1; ++r) {
      world.host_comm().barrier();
      const auto t0 = Clock::now();
      ForwardContext ctx;
      net->forward(images, ctx);
      world.host_comm().barrier();
      if (r) t.push_back(seconds_since(t0));
    }
    int64_t bytes = 0;
    for (const auto& p : net->expert_parameters()) bytes += p.numel() * 4;
    at::Tensor b = at::tensor({bytes}, at::kLong);
    world.host_comm().all_reduce(b, ReduceOp::Sum);
    return std::pair{B * world.size() / median(t), b.item<int64_t>()};
  };
  const auto [ips0, mem0] = measure(model);
  std::map<int, at::Tensor> now;
  std::map<int, std::vector<int>> ids;
  for (const auto& l : model->moe_layers()) {
    now[l->layer()] = layer_router_weights(*l);
    ids[l->layer()] = l->expert_ids();
  }
  if (world.rank() == 0)
    std::printf("pruning benchmark: %s from %s, %d rank(s), batch %lld, median of %d\n", mc.name.c_str(), dir.c_str(),
                world.size(), static_cast<long long>(B * world.size()), reps);
  if (world.rank() == 0)
    std::printf("  %-22s %12s %10s %14s %10s\n", "model", "images/s", "speed-up", "expert MiB", "memory");
  if (world.rank() == 0)
    std::printf("  %-22s %12.1f %10s %14.2f %10s\n", "unpruned", ips0, "1.00x", mem0 / 1048576.0, "1.00x");
  nlohmann::json res = {{"bench", "prune"}, {"model", mc.name}, {"ranks", world.size()},
                        {"unpruned_images_per_s", ips0}, {"unpruned_expert_bytes", mem0}};
  for (const char* routing : {"drop", "zero"}) {
    PruneConfig pc = cfg.prune;
    pc.ratio = 0.5;
    pc.routing = routing;
    const PrunePlan plan =
        make_plan(expert_scores("router_norm_change", history.reference(), now, {}, ids, cfg.seed), pc, mc.moe.top_k);
    std::vector<Placement> pl;
    for (const auto& lp : plan.layers)
      pl.push_back(Placement::contiguous(static_cast<int>(lp.kept.size()), world.size(), true));
    Migration mg = apply_plan(model, {}, plan, pl, world.comms(), 0);
    const auto [ips, mem] = measure(mg.model);
    if (world.rank() == 0)
      std::printf("  %-22s %12.1f %9.2fx %14.2f %9.2fx\n", concat("pruned 50%, ", routing).c_str(), ips, ips / ips0,
                  mem / 1048576.0, static_cast<double>(mem) / mem0);
    res[concat("pruned_", routing, "_images_per_s")] = ips;
    res[concat("pruned_", routing, "_expert_bytes")] = mem;
  }
  if (world.rank() == 0) std::printf("%s\n", res.dump().c_str());
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
  int reps = 5;
  auto* moe = app.add_subcommand("moe", "MoE layer forward+backward tokens/s against dense GEMMs of the same FLOPs");
  moe->add_option("--repeat", reps, "timed repetitions (median reported)");
  std::string from = "runs/vmoe-tiny/checkpoints";
  auto* prn = app.add_subcommand("prune", "inference images/s and expert memory before and after pruning 50%");
  prn->add_option("--from", from, "fine-tuning checkpoint or root (default: the demo's)");
  prn->add_option("--repeat", reps, "timed repetitions (median reported)");
  std::string prune_config;
  prn->add_option("--config", prune_config, "config of the checkpoint's job (default: embedded vmoe-tiny)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return world.rank() == 0 ? app.exit(e) : 0;
  }
  return run_ranks(world, [&](World& w) {
    w.set_threads();
    if (*moe) return bench_moe(w, reps);
    if (*prn) return bench_prune(w, parse_config(prune_config), from, reps);
    const JobConfig cfg = parse_config(config);
    return bench_ckpt(w, cfg, dir, repeat);
  });
}
