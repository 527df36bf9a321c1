// Training pieces in one process: the learning-rate schedule, the optimisers, the
// router history against router weights set by the test, the model file round
// trip, and a short fine-tune on the planted synthetic task that must learn.
#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "ckpt/model_file.h"
#include "core/error.h"
#include "prune/router_history.h"
#include "core/precision.h"
#include "train/trainer.h"
#include "test_models.h"
#include "test_tmp.h"

namespace moeprune {
namespace {

TEST(Schedule, WarmupThenCosine) {
  PhaseConfig p;
  p.lr = 1.0;
  p.end_lr = 0.1;
  p.warmup_steps = 4;
  p.steps = 14;
  EXPECT_DOUBLE_EQ(learning_rate(p, 0), 0.25);
  EXPECT_DOUBLE_EQ(learning_rate(p, 3), 1.0);
  EXPECT_NEAR(learning_rate(p, 4), 1.0, 1e-12);
  EXPECT_NEAR(learning_rate(p, 9), 0.55, 1e-12);  // half-way: (1 + 0.1) / 2
  EXPECT_NEAR(learning_rate(p, 14), 0.1, 1e-12);
}

TEST(Optimizer, SgdMomentumAndAdamWByHand) {
  SelfCommunicator comm;
  for (OptimizerKind kind : {OptimizerKind::Sgd, OptimizerKind::AdamW}) {
    PhaseConfig p;
    p.optimizer = kind;
    p.momentum = 0.9;
    p.clip_norm = 0;
    p.weight_decay = 0;
    at::Tensor w = at::tensor({1.0, -2.0}, at::kFloat).requires_grad_(true);
    Optimizer opt(p, {ParamSlot{"w", w, false, {}, {}, -1, {}, {}, {}, {}}});
    for (int s = 0; s < 2; ++s) {
      w.mutable_grad() = at::tensor({0.5, 1.0}, at::kFloat);
      opt.step(Comms{&comm, &comm}, 0.1);
    }
    if (kind == OptimizerKind::Sgd) {
      // buf1 = g, buf2 = 0.9 g + g -> w = w0 - 0.1 (g + 1.9 g)
      EXPECT_NEAR(w[0].item<double>(), 1.0 - 0.1 * 2.9 * 0.5, 1e-6);
    } else {
      // Constant gradient: Adam's bias-corrected step is lr * g/|g| = lr per step.
      EXPECT_NEAR(w[0].item<double>(), 1.0 - 0.2, 1e-5);
      EXPECT_NEAR(w[1].item<double>(), -2.0 - 0.2, 1e-5);
    }
  }
}

TEST(Optimizer, ClipsTheGlobalNorm) {
  SelfCommunicator comm;
  PhaseConfig p;
  p.optimizer = OptimizerKind::Sgd;
  p.momentum = 0;
  p.clip_norm = 1.0;
  at::Tensor a = at::zeros({1}).requires_grad_(true), b = at::zeros({1}).requires_grad_(true);
  Optimizer opt(p, {ParamSlot{"a", a, false, {}, {}, -1, {}, {}, {}, {}}, ParamSlot{"b", b, true, {}, {}, -1, {}, {}, {}, {}}});
  a.mutable_grad() = at::tensor({3.0f});
  b.mutable_grad() = at::tensor({4.0f});
  EXPECT_NEAR(opt.step(Comms{&comm, &comm}, 1.0), 5.0, 1e-9);
  EXPECT_NEAR(a.item<double>(), -0.6, 1e-5);
  EXPECT_NEAR(b.item<double>(), -0.8, 1e-5);
}

// A non-finite gradient norm (a NaN or inf loss upstream) stops training before the
// step touches the weights or the moments: DivergedError, exit code 3 (error.h).
TEST(Optimizer, NonFiniteGradientNormStopsBeforeTheUpdate) {
  SelfCommunicator comm;
  for (const float bad : {NAN, INFINITY}) {
    PhaseConfig p;  // AdamW
    at::Tensor a = at::ones({2}).requires_grad_(true), b = at::ones({1}).requires_grad_(true);
    Optimizer opt(p, {ParamSlot{"a", a, false, {}, {}, -1, {}, {}, {}, {}}, ParamSlot{"b", b, true, {}, {}, -1, {}, {}, {}, {}}});
    a.mutable_grad() = at::tensor({0.5f, 0.5f});
    b.mutable_grad() = at::tensor({bad});
    EXPECT_THROW(opt.step(Comms{&comm, &comm}, 0.1), DivergedError);
    EXPECT_TRUE(at::equal(a, at::ones({2})));
    EXPECT_TRUE(at::equal(b, at::ones({1})));
    EXPECT_EQ(opt.steps_taken(), 0);
  }
}

ModelConfig small_model(int classes) {
  ModelConfig m = test::small_vit(2, 4, classes);
  m.mlp_dim = 32;
  m.moe.group_size = 4;
  return m;
}

TEST(RouterHistory, NormsAndCountsFromRouterWeightsSetByTheTest) {
  SelfCommunicator comm;
  ModelConfig cfg = small_model(2);
  VisionTransformer model(cfg, default_placements(cfg, 1), comm, 0);
  auto layer = model->moe_layers()[0];
  at::Tensor& w = layer->routers[0]->as<RouterImpl>()->weight;
  at::NoGradGuard ng;
  w.zero_();
  w[0][0] = 3.0;  // expert 0: column (3, 0, ...), norm 3
  w[1][1] = 1.0;  // expert 1: norm 1
  RouterHistory h;
  h.snapshot(model);
  w[1][0] = 4.0;  // expert 0 -> (3, 4): norm 5, change +2, delta 4
  w[1][1] = 0.0;  // expert 1 -> 0: change -1, delta 1
  w[2][2] = 2.0;  // expert 2: 0 -> 2: change +2, delta 2
  LayerStats s;
  s.assigned = {5, 3, 0, 2};
  s.kept = {4, 3, 0, 2};
  s.soft = {1.5, 1.0, 0.25, 0.25};
  s.tokens = 5;
  h.accumulate({{1, s}});
  h.accumulate({{1, s}});
  const HistoryRecord& r = h.record(comm, model, 7);
  EXPECT_EQ(r.step, 7);
  const auto& e = r.layers.at(1);
  ASSERT_EQ(e.size(), 4u);
  EXPECT_NEAR(e[0].norm_change, 2.0, 1e-9);
  EXPECT_NEAR(e[0].delta_norm, 4.0, 1e-9);
  EXPECT_NEAR(e[1].norm_change, -1.0, 1e-9);
  EXPECT_NEAR(e[1].delta_norm, 1.0, 1e-9);
  EXPECT_NEAR(e[2].norm_change, 2.0, 1e-9);
  EXPECT_NEAR(e[3].norm_change, 0.0, 1e-9);
  EXPECT_EQ(e[0].assigned, 10);
  EXPECT_EQ(e[0].kept, 8);
  EXPECT_EQ(e[0].dropped, 2);
  EXPECT_NEAR(e[2].soft, 0.5, 1e-12);
  EXPECT_NE(RouterHistory::to_json(r).find("\"norm_change\":2.0"), std::string::npos);
}

TEST(ModelFile, RoundTripAndNewHead) {
  SelfCommunicator comm;
  ModelConfig cfg = small_model(3);
  at::manual_seed(1);
  VisionTransformer a(cfg, default_placements(cfg, 1), comm, 1);
  test::TempDir tmp("model-file");
  const std::string path = tmp / "model.safetensors";
  save_model(path, a, comm, {{"k", "v"}});
  at::manual_seed(2);
  VisionTransformer b(cfg, default_placements(cfg, 1), comm, 2);
  EXPECT_EQ(load_model(path, b).at("k"), "v");
  auto pa = a->named_parameters(), pb = b->named_parameters();
  for (const auto& it : pa) EXPECT_TRUE(at::equal(it.value(), pb[it.key()])) << it.key();
  // Fine-tuning start: another head size, zero head, and a larger resolution.
  ModelConfig c2 = small_model(5);
  c2.image_size = 12;
  VisionTransformer c(c2, default_placements(c2, 1), comm, 3);
  load_model(path, c, LoadOptions{true});
  EXPECT_EQ(c->head->weight.abs().sum().item<double>(), 0.0);
  EXPECT_EQ(c->pos_embed.size(1), 10);
  EXPECT_TRUE(at::equal(c->pos_embed[0][0], a->pos_embed[0][0]));  // class token position kept
  // Another hidden size is refused with the tensor's name.
  ModelConfig c3 = small_model(3);
  c3.hidden = 24;
  VisionTransformer d(c3, default_placements(c3, 1), comm, 3);
  try {
    load_model(path, d);
    FAIL() << "a 24-wide model must not load a 16-wide file";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("the model needs"), std::string::npos) << e.what();
  }
}

JobConfig planted_job() {
  JobConfig job;
  job.seed = 4;
  job.model = small_model(2);
  job.data.dataset = DatasetKind::Planted;
  job.data.planted_train = 1024;
  job.data.planted_test = 512;
  job.data.planted_patches = 1;
  job.data.planted_noise = 0.5;
  job.data.prefetch = 1;
  PhaseConfig p;
  p.optimizer = OptimizerKind::AdamW;
  p.lr = 3e-3;
  p.end_lr = 1e-4;
  p.warmup_steps = 10;
  p.steps = 120;
  p.batch_size = 32;
  p.log_every = 1000;
  job.finetune = p;
  return job;
}

// Trains on the planted task in one process; returns the result and the model.
std::pair<PhaseResult, VisionTransformer> train_planted(const JobConfig& job) {
  static SelfCommunicator comm;  // outlives the returned model, which points to it
  const PhaseConfig& p = job.finetune;
  Split train = make_split(load_dataset(job, SplitPart::Train), p, "finetune", SplitPart::Train, 0.1);
  Split val = make_split(load_dataset(job, SplitPart::Train), p, "finetune", SplitPart::Val, 0.1);
  Split test = make_split(load_dataset(job, SplitPart::Test), p, "finetune", SplitPart::Test, 0.1);
  LoaderOptions lo;
  lo.image_size = 8;
  lo.seed = job.seed;
  lo.global_batch = 32;
  ShardedLoader tl(train, lo);
  lo.train = false;
  lo.global_batch = 64;
  ShardedLoader vl(val, lo), sl(test, lo);
  at::manual_seed(4);
  VisionTransformer model(job.model, default_placements(job.model, 1), comm, 4);
  MetricsSink sink;
  Trainer trainer(Comms{&comm, &comm}, job, p, Phase::Finetune, model, sink);
  return {trainer.run(tl, vl, &sl), model};
}

TEST(Training, ShortFineTuneOnPlantedTaskLearns) {
  const JobConfig job = planted_job();
  const PhaseResult r = train_planted(job).first;
  // Chance is 50%; the planted feature decides the label.
  EXPECT_GT(r.test.accuracy, 0.85) << "test accuracy " << r.test.accuracy;
  EXPECT_EQ(r.test.count, 512);
}

TEST(Training, SameSeedGivesBitIdenticalRuns) {
  JobConfig job = planted_job();
  job.finetune.steps = 15;
  job.finetune.log_every = 1;
  auto [ra, a] = train_planted(job);
  auto [rb, b] = train_planted(job);
  EXPECT_EQ(ra.train_loss, rb.train_loss);  // exact: same seed, same world size, CPU
  auto pb = b->named_parameters();
  for (const auto& it : a->named_parameters()) EXPECT_TRUE(at::equal(it.value(), pb[it.key()])) << it.key();
  job.seed = 5;  // and the seed matters
  EXPECT_NE(train_planted(job).first.train_loss, ra.train_loss);
}

// bf16 autocast: the forward runs in bfloat16 on the CPU as on the GPU; the router,
// the loss, the master weights and the optimiser state stay float32.
TEST(Training, Bf16AutocastLearnsWithFloat32MasterWeights) {
  JobConfig job = planted_job();
  job.finetune.precision = Precision::Bf16;
  auto [r, model] = train_planted(job);
  EXPECT_GT(r.test.accuracy, 0.85) << "test accuracy " << r.test.accuracy;
  for (const auto& p : model->parameters()) EXPECT_EQ(p.scalar_type(), at::kFloat);
  EXPECT_FALSE(at::autocast::is_autocast_enabled(at::kCPU)) << "the guard restores the autocast state";
}

TEST(Precision, RouterIsFloat32AndExpertsBf16UnderAutocast) {
  SelfCommunicator comm;
  ModelConfig mc = small_model(1);
  at::manual_seed(3);
  MoeLayer layer(mc, 1, Placement::contiguous(mc.moe.num_experts, 1), comm, 3);
  at::Tensor x = at::randn({4 * mc.moe.group_size, 5, mc.hidden});
  auto route = [&](bool amp) {
    AutocastGuard g(x.device(), amp ? Precision::Bf16 : Precision::Fp32);
    return layer->routers[0]->as<RouterImpl>()->forward(x.reshape({4, -1, mc.hidden}), false, {}, TorchSelector());
  };
  Routing a = route(true), b = route(false);
  EXPECT_EQ(a.probs.scalar_type(), at::kFloat);
  EXPECT_TRUE(at::equal(a.probs, b.probs)) << "routing must not see bf16 rounding";
  EXPECT_TRUE(at::equal(a.expert, b.expert));
  ForwardContext c1, c2;
  c1.in.total_groups = c2.in.total_groups = 4;
  at::Tensor y32 = layer->forward(x, c1);
  at::Tensor y16;
  {
    AutocastGuard g(x.device(), Precision::Bf16);
    y16 = layer->forward(x, c2);
  }
  EXPECT_EQ(y16.scalar_type(), at::kBFloat16);
  const double rel = ((y16.to(at::kFloat) - y32).abs().max() / y32.abs().max()).item<double>();
  EXPECT_LT(rel, 3e-2) << "bf16 has 8 bits of mantissa: a few rounding steps of 2^-8";
  EXPECT_GT(rel, 0.0) << "the experts really ran in bf16";
  EXPECT_THROW(parse_choice<Precision>("fp16", "precision"), UserError);
}

}  // namespace
}  // namespace moeprune
