// Pruning across ranks: the plan hash check refuses plans that differ between
// ranks; a pruned model gives the same outputs before and after rebalancing
// (placement invariance) and the same as one process holding the same pruned
// model, on 1, 2 and 4 ranks and on every process mesh W = D x N of them, for drop
// and zero routing.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include "core/precision.h"
#include "dist/mesh.h"
#include "prune/plan.h"
#include "prune/prune_job.h"
#include "prune/rebalance.h"
#include "train/trainer.h"
#include "test_world.h"
#include "test_models.h"

namespace moeprune::test {
namespace {

TEST(PruneMpi, DifferentPlansAreRefusedOnEveryRank) {
  World& w = *g_world;
  PrunePlan p;
  p.routing = PrunedRouting::Drop;
  p.layers.push_back(LayerPlan{1, {0, 1, 2}, {3}, {}, {}});
  EXPECT_NO_THROW(plan_agreement(p, w.host_comm()));
  if (w.size() == 1) GTEST_SKIP() << "needs two ranks to disagree";
  if (w.rank() == 1) p.layers[0].kept = {0, 1, 3};
  try {
    plan_agreement(p, w.host_comm());
    ADD_FAILURE() << "rank " << w.rank() << " accepted a plan the other ranks do not hold";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("the ranks computed different pruning plans"), std::string::npos) << e.what();
  }
}

ModelConfig model_cfg() {
  ModelConfig m = small_vit(4, 8, 3);
  m.moe.capacity_factor = 1.0;
  return m;
}

at::Tensor run(VisionTransformer& model, const at::Tensor& images) {
  at::NoGradGuard ng;
  ForwardContext ctx;
  return model->forward(images, ctx);
}

TEST(PruneMpi, PlacementInvarianceAndSingleProcessOracle) {
  World& w = *g_world;
  const int W = w.size(), r = w.rank();
  const ModelConfig mc = model_cfg();
  const int64_t B = 4 * W, local = 4;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  at::Tensor images = at::randn({B, 1, 8, 8}, gen, at::kFloat);
  at::Tensor mine = images.narrow(0, r * local, local);
  // Expert-parallel over all ranks, and on every mesh W = D x N with D > 1 (each
  // group prunes and moves its copies of the experts the same way).
  for (int N = W; N >= 1; --N) {
    if (W % N != 0) continue;
    Mesh mesh(w.host_comm(), w.host_comm(), N);
    const Comms c = N == W ? w.comms() : mesh.comms();
    for (PrunedRouting routing : {PrunedRouting::Drop, PrunedRouting::Zero}) {
      SCOPED_TRACE(concat("mesh ", W / N, " x ", N));
      PrunePlan plan;
      plan.routing = routing;
      plan.layers.push_back(LayerPlan{1, {0, 2, 3, 5, 6}, {1, 4, 7}, {}, {}});  // uneven survivors per layer
      plan.layers.push_back(LayerPlan{3, {1, 2, 4, 7}, {0, 3, 5, 6}, {}, {}});

      at::manual_seed(3);
      VisionTransformer model(mc, default_placements(mc, N), c.ep(), 3);
      // Survivors first stay where they are, then move to a scattered placement.
      std::vector<Placement> stay, scattered;
      for (const auto& lp : plan.layers) {
        std::vector<int> a, b;
        for (size_t i = 0; i < lp.kept.size(); ++i) {
          a.push_back(model->moe_layers()[0]->placement().rank_of(lp.kept[i]));
          b.push_back(static_cast<int>((i * 3 + 1) % N));
        }
        stay.push_back(Placement(a, N));
        scattered.push_back(Placement(b, N));
      }
      // Masking the unpruned model as the plan prunes it (prune.ratio: auto) = pruning it.
      mask_experts(model, &plan);
      const at::Tensor masked = run(model, mine);
      mask_experts(model, nullptr);
      const at::Tensor unmasked = run(model, mine);
      Migration pruned = apply_plan(model, {}, plan, stay, c, 3);
      const at::Tensor out1 = run(pruned.model, mine);
      // The batched expert product, `auto`'s choice for these small experts in bf16
      // (and asked for in float32), is placement-invariant too.
      const auto batched = [&](VisionTransformer& m) {
        std::vector<at::Tensor> v;
        {
          AutocastGuard amp(at::Device(at::kCPU), Precision::Bf16);
          v.push_back(run(m, mine));
        }
        m->set_runtime(MoeRuntime{DispatcherKind::Auto, ExpertGemm::Batched});
        v.push_back(run(m, mine));
        m->set_runtime(MoeRuntime{});
        return v;
      };
      const std::vector<at::Tensor> batched1 = batched(pruned.model);
      EXPECT_LE(rel_err(masked, out1), 1e-5) << name_of(routing) << ": masked evaluation differs from the pruned model";
      EXPECT_GT(rel_err(unmasked, out1), 1e-3) << name_of(routing) << ": the plan changes nothing (test cannot fail)";
      Migration moved = replace_experts(pruned.model, pruned.slots, scattered, c, 3);
      const at::Tensor out2 = run(moved.model, mine);
      EXPECT_TRUE(at::equal(out1, out2)) << name_of(routing) << ": rebalancing changed the outputs";
      const std::vector<at::Tensor> batched2 = batched(moved.model);
      for (size_t i = 0; i < batched1.size(); ++i)
        EXPECT_TRUE(at::equal(batched1[i], batched2[i]))
            << name_of(routing) << (i ? ": batched float32" : ": bf16 (batched)") << ": rebalancing changed the outputs";
      if (N >= 2) {
        // Replicas of the hottest experts (prune.replicate): the same outputs up to the
        // rounding of the expert GEMMs (a copy multiplies a subset of its expert's rows,
        // and the CPU GEMM's blocking, hence its rounding, depends on the row count:
        // 4e-8..4e-7 measured); and bit-identical again without them.
        std::vector<Placement> copies;
        for (const auto& lp : plan.layers) copies.push_back(replicated(static_cast<int>(lp.kept.size()), N));
        Migration rep = replace_experts(moved.model, moved.slots, copies, c, 3);
        EXPECT_LE(rel_err(out1, run(rep.model, mine)), 1e-5) << name_of(routing) << ": replicas changed the outputs";
        Migration back = replace_experts(rep.model, rep.slots, stay, c, 3);
        EXPECT_TRUE(at::equal(out1, run(back.model, mine))) << name_of(routing) << ": leaving replicas changed them";
      }

      // The same pruned model in one process.
      SelfCommunicator self;
      at::manual_seed(3);
      VisionTransformer whole(mc, default_placements(mc, 1), self, 3);
      std::vector<Placement> one;
      for (const auto& lp : plan.layers) one.push_back(Placement::contiguous(static_cast<int>(lp.kept.size()), 1));
      Migration ref = apply_plan(whole, {}, plan, one, Comms{&self, &self}, 3);
      const at::Tensor want = run(ref.model, images).narrow(1, r * local, local);
      EXPECT_LE(rel_err(out2, want), 1e-5) << name_of(routing);
      EXPECT_EQ(ref.bytes_moved, 0);
    }
  }
}

// The report's "what the experts contribute": masking every expert away (zero routing,
// none kept) is the model whose experts all output zero.
TEST(PruneMpi, MaskingEveryExpertEqualsZeroExpertWeights) {
  World& w = *g_world;
  const int W = w.size(), r = w.rank();
  const ModelConfig mc = model_cfg();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  at::Tensor mine = at::randn({4 * W, 1, 8, 8}, gen, at::kFloat).narrow(0, r * 4, 4);
  at::manual_seed(3);
  VisionTransformer model(mc, default_placements(mc, W), w.comm(), 3);
  PrunePlan none;
  none.routing = PrunedRouting::Zero;
  for (const auto& l : model->moe_layers()) none.layers.push_back(LayerPlan{l->layer(), {}, l->expert_ids(), {}, {}});
  mask_experts(model, &none);
  const at::Tensor masked = run(model, mine);
  mask_experts(model, nullptr);
  const at::Tensor full = run(model, mine);
  {
    at::NoGradGuard ng;
    for (MoeLayer l : model->moe_layers()) {
      l->experts->w2.zero_();
      l->experts->b2.zero_();
    }
  }
  const at::Tensor zeroed = run(model, mine);
  EXPECT_LE(rel_err(masked, zeroed), 1e-6);
  EXPECT_GT(rel_err(full, zeroed), 1e-3) << "the experts contribute nothing here: the test cannot fail";
}

}  // namespace
}  // namespace moeprune::test
