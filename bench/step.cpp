// moeprune-bench step: one training step (forward, backward, gradient sync,
// optimiser) of a model at a fixed per-rank batch; run on 1, 2, 4 ranks it is weak
// scaling (launch/bench_scaling.sh reads its JSON lines).
#include <chrono>
#include <cstdio>
#include <memory>

#ifdef MOEPRUNE_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "benches.h"
#include "core/error.h"
#include "core/precision.h"
#include "harness.h"
#include "model/trace_range.h"
#include "pipeline/job.h"
#include "train/grad_buckets.h"
#include "train/trainer.h"

namespace moeprune::bench {
namespace {
// Peak bytes held by LibTorch's CUDA allocator since the last reset (0 on CPUs).
void reset_peak_memory(const c10::Device& dev) {
#ifdef MOEPRUNE_WITH_CUDA
  if (dev.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(dev.index());
#else
  (void)dev;
#endif
}
double peak_memory_gib(const c10::Device& dev) {
#ifdef MOEPRUNE_WITH_CUDA
  if (dev.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(dev.index());
    return static_cast<double>(
               stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak) /
           (1024.0 * 1024.0 * 1024.0);
  }
#else
  (void)dev;
#endif
  return 0.0;
}
}  // namespace

int step(World& world, const Options& o) {
  JobConfig cfg = parse_config(o.config, o.overrides);
  if (!o.precision.empty()) cfg.finetune.precision = parse_choice<Precision>(o.precision, "--precision");
  const ModelConfig& mc = cfg.model;
  world.set_mesh(expert_parallel_of(cfg, world.size()));
  const Comms comms = world.comms();
  const int per_rank = o.per_rank;
  require(per_rank % mc.moe.group_size == 0,
          concat("bench step: --per-rank-batch ", per_rank, " must be a multiple of group_size ", mc.moe.group_size));
  const c10::Device dev = world.device();
  VisionTransformer model = build_job_model(cfg, mc, default_placements(mc, world.ep_size()), world);
  model->train();
  Optimizer opt(cfg.finetune, param_slots(model));
  std::unique_ptr<GradBuckets> buckets;
  if (cfg.parallel.grad_reduce == GradReduce::Overlap && world.size() > 1)
    buckets = std::make_unique<GradBuckets>(opt.slots(), comms.grad(),
                                            static_cast<int64_t>(cfg.parallel.bucket_mb * (1 << 20)));
  double sync_s = 0;  // time after backward until the gradients are summed (the exposed reduction)
  at::manual_seed(100 + world.rank());
  const auto t_opt = at::TensorOptions().device(dev);
  at::Tensor images = at::randn({per_rank, mc.channels, mc.image_size, mc.image_size}, t_opt);
  at::Tensor labels = at::randint(mc.num_classes, {per_rank}, t_opt.dtype(at::kLong));
  const int64_t groups = static_cast<int64_t>(per_rank) * world.size() / mc.moe.group_size;
  int64_t n = 0;
  reset_peak_memory(dev);
  const auto train_step = [&] {
    TraceRange range("step::forward");  // phases for bench/step_phases.py
    opt.zero_grad();
    ForwardContext ctx;
    ctx.in.train = true;
    ctx.in.noise_seed = static_cast<uint64_t>(++n);
    ctx.in.total_groups = groups;
    ctx.in.first_group = world.rank() * per_rank / mc.moe.group_size;
    at::Tensor logits;
    {
      AutocastGuard amp(dev, cfg.finetune.precision);
      logits = model->forward(images, ctx);
    }
    at::Tensor loss = cross_entropy_sum(logits.to(at::kFloat), labels) / static_cast<double>(per_rank) +
                      ctx.aux_loss / static_cast<double>(groups);
    if (buckets) buckets->arm();
    range.next("step::backward");
    loss.backward();
    range.next("step::grad_sync");
    const auto t0 = std::chrono::steady_clock::now();
    if (buckets) buckets->finish();
    opt.sync_gradients(comms, /*dense=*/!buckets);
    sync_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    range.next("step::optimizer");
    opt.step(comms, 1e-3);
  };
  const Timing t = time_it(world, o.reps, train_step);
  const double sync_ms = 1e3 * sync_s / (o.reps + 1);  // warm-up included
  profile_to(world, o.profile, 3, train_step);
  const double ips = per_rank * world.size() / t.median;
  const double peak_gib = peak_memory_gib(dev);
  if (world.rank() == 0)
    std::printf("training step, %s, %d rank(s) = %d x %d expert-parallel on %s, %s, %d images per rank, %d threads "
                "per rank, median of %d: %.1f ms/step (spread %.0f%%), %.1f images/s (%.1f per rank), gradient sync "
                "after backward %.2f ms (%s), peak GPU memory %.2f GiB\n",
                mc.name.c_str(), world.size(), comms.groups(), comms.ep_size(), dev.str().c_str(),
                str(cfg.finetune.precision).c_str(), per_rank, at::get_num_threads(), o.reps, 1e3 * t.median,
                100 * t.spread(), ips, ips / world.size(), sync_ms,
                buckets ? concat("overlap, ", buckets->size(), " buckets").c_str() : "flat", peak_gib);
  nlohmann::json row = {{"model", mc.name}, {"precision", str(cfg.finetune.precision)},
                        {"threads_per_rank", at::get_num_threads()}, {"per_rank_batch", per_rank},
                        {"images_per_s", ips}, {"peak_gpu_gib", peak_gib}, {"expert_parallel", comms.ep_size()},
                        {"groups", comms.groups()}, {"grad_reduce", buckets ? "overlap" : "flat"},
                        {"grad_sync_ms", sync_ms}};
  row.update(timing_json("step", t));
  json_row(world, "step", row);
  return 0;
}

}  // namespace moeprune::bench
