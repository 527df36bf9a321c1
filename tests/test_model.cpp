// The model in one process: shapes, MoE block placement, E3 repetition and
// ensemble prediction, and the parameter split into dense and expert parts.
#include <gtest/gtest.h>

#include <cmath>

#include "model/vit.h"
#include "test_models.h"

namespace moeprune {
namespace {

ModelConfig tiny(int members) {
  ModelConfig m = test::small_vit(4, 4, 3);
  m.mlp_dim = 32;
  m.num_heads = 4;
  m.moe.top_k = members > 1 ? 1 : 2;
  m.moe.ensemble_size = members;
  return m;
}

TEST(Model, ShapesAndMoeBlocks) {
  SelfCommunicator comm;
  ModelConfig cfg = tiny(1);
  VisionTransformer model(cfg, default_placements(cfg, 1), comm, 0);
  EXPECT_EQ(model->moe_layers().size(), 2u);
  EXPECT_EQ(model->moe_layers()[0]->layer(), 1);
  EXPECT_EQ(model->moe_layers()[1]->layer(), 3);
  ForwardContext ctx;
  ctx.in.total_groups = 2;
  at::Tensor logits = model->forward(at::randn({4, 1, 8, 8}), ctx);
  EXPECT_EQ(logits.sizes(), (std::vector<int64_t>{1, 4, 3}));
  EXPECT_TRUE(ctx.aux_loss.defined());
  // 4 experts * (w1, b1, w2, b2) stacked in 4 tensors per layer.
  EXPECT_EQ(model->expert_parameters().size(), 8u);
  EXPECT_EQ(model->expert_parameters()[0].sizes(), (std::vector<int64_t>{4, 16, 32}));
  EXPECT_EQ(model->dense_parameters().size() + model->expert_parameters().size(), model->parameters().size());
}

TEST(Model, E3EnsemblePrediction) {
  SelfCommunicator comm;
  ModelConfig cfg = tiny(2);
  cfg.moe.every = 0;
  cfg.moe.last = 1;
  VisionTransformer model(cfg, default_placements(cfg, 1), comm, 0);
  ForwardContext ctx;
  ctx.in.total_groups = 2;
  at::Tensor logits = model->forward(at::randn({4, 1, 8, 8}), ctx);
  EXPECT_EQ(logits.sizes(), (std::vector<int64_t>{2, 4, 3}));
  at::Tensor lp = ensemble_log_probs(logits);
  at::Tensor want = at::log((at::softmax(logits[0], -1) + at::softmax(logits[1], -1)) / 2);
  EXPECT_TRUE(at::allclose(lp, want, 1e-5, 1e-6));
  // Per-member loss: mean over members of each member's summed cross-entropy.
  at::Tensor labels = at::tensor({0, 1, 2, 0}, at::kLong);
  at::Tensor ce = cross_entropy_sum(logits, labels);
  double expected = 0;
  for (int m = 0; m < 2; ++m)
    for (int b = 0; b < 4; ++b)
      expected -= at::log_softmax(logits[m][b], -1)[labels[b].item<int64_t>()].item<double>() / 2;
  EXPECT_NEAR(ce.item<double>(), expected, 1e-4);
  // Each member's router chooses among its own 2 experts.
  EXPECT_EQ(model->moe_layers()[0]->routers->size(), 2u);
  EXPECT_EQ(model->moe_layers()[0]->routers[0]->as<RouterImpl>()->weight.size(1), 2);
}

TEST(Model, ExpertsDoNotDependOnPlacement) {
  ExpertBank all(16, 32, std::vector<int>{0, 1, 2, 3}, 1, 7);
  ExpertBank some(16, 32, std::vector<int>{1, 3}, 1, 7);
  EXPECT_TRUE(at::equal(some->w1[0], all->w1[1]));
  EXPECT_TRUE(at::equal(some->w2[1], all->w2[3]));
  EXPECT_FALSE(at::equal(all->w1[0], all->w1[1]));
}

}  // namespace
}  // namespace moeprune
