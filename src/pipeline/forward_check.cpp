#include "pipeline/forward_check.h"

#include <ATen/CPUGeneratorImpl.h>

#include "core/error.h"
#include "core/log.h"
#include "model/vit.h"
#include "pipeline/job.h"

namespace moeprune {
namespace {

// Sums x over ranks (host doubles), so every rank holds the global figure.
std::vector<double> global_sums(World& world, std::vector<double> local) {
  at::Tensor t = at::tensor(local, at::kDouble);
  world.host_comm().all_reduce(t, ReduceOp::Sum);
  return std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
}

}  // namespace

ForwardFigures forward_check(World& world, const JobConfig& cfg) {
  const ModelConfig& mc = cfg.model;
  const int W = world.size(), r = world.rank();
  const int64_t B = cfg.finetune.batch_size, local_B = B / W;
  const int64_t total_groups = B / mc.moe.group_size;

  const Comms comms = world.comms();
  const int N = comms.ep_size(), pos = comms.ep_rank();
  VisionTransformer model = build_job_model(cfg, mc, default_placements(mc, N), world);
  model->train();
  log::info(concat("forward: model ", mc.name, " with ", mc.moe_blocks().size(), " MoE layers of ", mc.moe.num_experts,
                   " experts (top-", mc.moe.top_k, ", E3 members ", mc.moe.ensemble_size, "), ", W, " ranks (",
                   comms.groups(), " x ", N, " expert-parallel), device ",
                   world.device().str(), ", global batch ", B));

  // The fixed global batch, generated identically on every rank; each takes its slice.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(cfg.seed + 1);
  at::Tensor images = at::randn({B, mc.channels, mc.image_size, mc.image_size}, gen, at::kFloat);
  at::Tensor labels = at::randint(mc.num_classes, {B}, gen, at::TensorOptions().dtype(at::kLong));
  images = images.narrow(0, r * local_B, local_B).to(world.device());
  labels = labels.narrow(0, r * local_B, local_B).to(world.device());

  std::vector<std::vector<int64_t>> expert_rows;
  ForwardContext ctx;
  ctx.in.train = true;
  ctx.in.noise_seed = cfg.seed;
  ctx.in.first_group = r * local_B / mc.moe.group_size;
  ctx.in.total_groups = total_groups;
  ctx.probes.expert_rows = &expert_rows;
  at::Tensor logits = model->forward(images, ctx);
  at::Tensor loss = cross_entropy_sum(logits, labels) / static_cast<double>(B) +
                    ctx.aux_loss / static_cast<double>(mc.moe.ensemble_size * total_groups);
  loss.backward();
  for (at::Tensor& p : model->dense_parameters()) {
    at::Tensor g = p.grad();
    world.comm().all_reduce(g, ReduceOp::Sum);
  }
  // An expert's gradient is the sum of its replicas' (one per expert-parallel group);
  // the checksums count each expert once, on group 0.
  if (comms.edp_device)
    for (at::Tensor& p : model->expert_parameters()) {
      if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);  // every replica joins the collective
      at::Tensor g = p.grad();
      comms.edp_device->all_reduce(g, ReduceOp::Sum);
    }

  // Checksums are sums of non-negative terms (no cancellation), accumulated in
  // float64, so that the float32 rounding differences between world sizes
  // (reduction order, ~1e-7 relative) stay below the printed 5 digits.
  auto abs_sum = [](const at::Tensor& t) { return t.to(at::kDouble).abs().sum().item<double>(); };
  auto sq_sum = [](const at::Tensor& t) { return t.to(at::kDouble).pow(2).sum().item<double>(); };
  ForwardFigures f;
  f.model_name = mc.name;
  f.device = world.device().str();
  f.ranks = W;
  double exp_abs = 0, exp_sq = 0;
  for (const auto& p : model->dense_parameters()) {
    f.dense_grad_abs += abs_sum(p.grad());
    f.dense_grad_sq += sq_sum(p.grad());
  }
  for (const auto& p : model->expert_parameters()) {
    if (!p.grad().defined() || !comms.writes_experts()) continue;  // no local expert received a token; a replica
    exp_abs += abs_sum(p.grad());
    exp_sq += sq_sum(p.grad());
  }
  const auto g = global_sums(world, {loss.item<double>(), abs_sum(logits.detach()), sq_sum(logits.detach()),
                                     exp_abs, exp_sq});
  f.loss = g[0];
  f.out_abs = g[1];
  f.out_sq = g[2];
  f.expert_grad_abs = g[3];
  f.expert_grad_sq = g[4];

  // Rows computed by each expert, summed over ranks in expert order.
  const auto layers = model->moe_layers();
  for (size_t l = 0; l < layers.size(); ++l) {
    const Placement& pl = layers[l]->placement();
    std::vector<int64_t> all(pl.num_experts(), 0);
    const auto& mine = pl.local_experts(pos);
    for (size_t i = 0; i < mine.size(); ++i) all[mine[i]] += expert_rows[l][i];
    at::Tensor t = at::tensor(all, at::kLong);
    world.host_comm().all_reduce(t, ReduceOp::Sum);
    std::string line = concat("layer ", layers[l]->layer(), ":");
    for (int rr = 0; rr < N; ++rr) {
      line += concat(" rank", rr, "{");
      const auto& held = pl.local_experts(rr);
      for (size_t i = 0; i < held.size(); ++i) line += concat(i ? " " : "", "e", held[i], "=", t[held[i]].item<int64_t>());
      line += "}";
    }
    f.expert_rows.push_back(line);
  }
  return f;
}

}  // namespace moeprune
