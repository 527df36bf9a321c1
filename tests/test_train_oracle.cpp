// Multi-rank training equals single-process training with the same routing
// groups: a few SGD steps on W ranks end with the parameters of one process
// training on the whole global batch (relative error <= 1e-5: float32 reduction
// order differs between the two, nothing else may).
#include <gtest/gtest.h>

#include "dist/mesh.h"
#include "train/grad_buckets.h"
#include "train/trainer.h"
#include "test_world.h"
#include "test_models.h"

namespace moeprune::test {
namespace {

TEST(TrainOracle, FewStepsMatchSingleProcess) {
  World& w = *g_world;
  JobConfig job;
  job.seed = 11;
  job.model = small_vit(2, 4, 2);
  const ModelConfig& m = job.model;
  job.data.dataset = DatasetKind::Planted;
  job.data.planted_train = 256;
  job.data.planted_test = 64;
  job.data.prefetch = 0;
  PhaseConfig p;
  p.optimizer = OptimizerKind::Sgd;
  p.lr = 0.05;
  p.warmup_steps = 1;
  p.steps = 4;
  p.batch_size = 16;
  p.accumulation = 2;  // micro-batch 8 = 4 groups: 4, 2 or 1 per rank
  p.log_every = 1;
  p.clip_norm = 0.5;   // clipping is active and must agree
  job.finetune = p;
  auto data = load_dataset(job, SplitPart::Train);
  Split train = make_split(data, p, "finetune", SplitPart::Train, 0.25);
  Split val = make_split(data, p, "finetune", SplitPart::Val, 0.25);

  auto run = [&](Comms comms, const std::vector<Placement>& placements) {
    LoaderOptions lo;
    lo.image_size = 8;
    lo.seed = job.seed;
    lo.global_batch = 8;
    lo.rank = comms.rank();
    lo.world = comms.size();
    lo.prefetch = 0;
    ShardedLoader tl(train, lo);
    lo.train = false;
    lo.global_batch = 16;
    ShardedLoader vl(val, lo);
    at::manual_seed(job.seed);
    VisionTransformer model(m, placements, comms.ep(), job.seed);
    MetricsSink sink;
    Trainer t(comms, job, p, Phase::Finetune, model, sink);
    PhaseResult r = t.run(tl, vl, nullptr);
    return std::pair{model, r};
  };
  SelfCommunicator self;
  auto [ref, ref_r] = run(Comms{&self, &self}, default_placements(m, 1));
  // Expert-parallel over all ranks, then every smaller mesh W = D x N (D > 1): the
  // experts' replicas average their gradients and clipping counts each expert once.
  // Dense gradients in buckets during backward (the default) and in one piece after it.
  // With N >= 2, also with hot-expert replicas: their gradients are summed among
  // the copies, clipping counts each expert once, and the copies stay identical.
  for (int N = w.size(); N >= 1; --N) {
    for (int variant = 0; variant < (N >= 2 ? 3 : 2); ++variant) {
      if (w.size() % N != 0) continue;
      const GradReduce mode = variant == 1 ? GradReduce::Flat : GradReduce::Overlap;
      const bool replicas = variant == 2;
      job.parallel.grad_reduce = mode;
      job.parallel.bucket_mb = 0.001;  // ~1 KiB: several buckets even for this small model
      SCOPED_TRACE(concat("mesh ", w.size() / N, " x ", N, ", grad_reduce ", name_of(mode),
                          replicas ? ", replicas" : ""));
      Mesh mesh(w.host_comm(), w.host_comm(), N);
      std::vector<Placement> pls = default_placements(m, N);
      if (replicas)
        for (auto& pl : pls) pl = replicated(m.moe.num_experts, N);
      auto [dist, dist_r] = run(N == w.size() ? w.comms() : mesh.comms(), pls);
      EXPECT_NEAR(dist_r.train_loss, ref_r.train_loss, 1e-5 * std::abs(ref_r.train_loss));
      EXPECT_NEAR(dist_r.val.loss, ref_r.val.loss, 1e-5 * std::abs(ref_r.val.loss));
      auto rp = ref->named_parameters();
      for (const auto& item : dist->named_parameters()) {
        at::Tensor want = rp[item.key()];
        if (item.key().find(".experts.") != std::string::npos) {
          const auto& ids = dist->moe_layers()[0]->experts->expert_ids();
          want = want.index_select(0, at::tensor(std::vector<int64_t>(ids.begin(), ids.end()), at::kLong));
        }
        EXPECT_LE(rel_err(item.value().detach(), want.detach()), 1e-5) << item.key();
      }
    }
  }
  // Training moved the parameters (the comparison is not of untouched weights).
  at::manual_seed(job.seed);
  VisionTransformer fresh(m, default_placements(m, 1), self, job.seed);
  EXPECT_GT(rel_err(fresh->head->weight, ref->head->weight), 1e-3);
}

// The buckets start during backward (not all at finish()), in bucket order on every
// rank, and their sums equal the flat all-reduce's, step after step.
TEST(GradBuckets, StartDuringBackwardAndSumLikeFlat) {
  World& w = *g_world;
  // On CPUs over MPI; on a GPU machine also on the device over NCCL (hooks on
  // autograd's device thread, all-reduces on the side stream).
  std::vector<std::pair<c10::Device, Communicator*>> where{{c10::Device(c10::kCPU), &w.host_comm()}};
  if (w.device().is_cuda()) where.emplace_back(w.device(), &w.comm());
  for (auto [dev, comm] : where) {
    SCOPED_TRACE(dev.str());
    const ModelConfig m = small_vit(2, 4, 2);
    at::manual_seed(4);
    VisionTransformer model(m, default_placements(m, w.size()), *comm, 4);
    model->to(dev);
    Comms comms{comm, &w.host_comm()};
    auto backward = [&] {
      ForwardContext ctx;
      ctx.in.train = true;
      ctx.in.first_group = w.rank();
      ctx.in.total_groups = w.size();
      at::manual_seed(100 + w.rank());
      at::Tensor logits =
          model->forward(at::randn({m.moe.group_size, m.channels, m.image_size, m.image_size}).to(dev), ctx);
      (logits.pow(2).sum() + ctx.aux_loss).backward();
    };
    PhaseConfig pc;
    Optimizer flat_opt(pc, param_slots(model));
    flat_opt.zero_grad();
    backward();
    flat_opt.sync_gradients(comms);
    std::vector<at::Tensor> want;
    for (const auto& s : flat_opt.slots())
      want.push_back(s.param.grad().defined() ? s.param.grad().clone() : at::Tensor());

    Optimizer opt(pc, param_slots(model));
    GradBuckets buckets(opt.slots(), *comm, 2048);
    ASSERT_GT(buckets.size(), 2u);
    for (int round = 0; round < 2; ++round) {  // twice: the state resets between steps
      opt.zero_grad();
      buckets.arm();
      backward();
      if (w.size() > 1) {
        EXPECT_GT(buckets.started_in_backward(), 0) << "nothing overlapped backward";
      }
      buckets.finish();
      for (size_t i = 0; i < opt.slots().size(); ++i) {
        const ParamSlot& s = opt.slots()[i];
        if (s.expert || !want[i].defined()) continue;
        EXPECT_LE(rel_err(s.param.grad(), want[i]), 1e-6) << s.name;
      }
    }
  }
}

}  // namespace
}  // namespace moeprune::test
