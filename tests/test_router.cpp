// Router: capacity formula, top-1-before-top-2 priority, BPR order, dropping,
// and the auxiliary losses against values computed by hand.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cmath>

#include "model/router.h"

namespace moeprune {
namespace {

at::Tensor longs(std::vector<int64_t> v, std::vector<int64_t> shape) { return at::tensor(v, at::kLong).reshape(shape); }
at::Tensor floats(std::vector<float> v, std::vector<int64_t> shape) { return at::tensor(v).reshape(shape); }

TEST(Router, CapacityFormula) {
  EXPECT_EQ(expert_capacity(400, 2, 1.05, 8), 108);  // ceil(105) -> 108
  EXPECT_EQ(expert_capacity(10, 1, 1.0, 4), 4);      // ceil(2.5)=3 -> 4
  EXPECT_EQ(expert_capacity(16, 2, 1.0, 8), 4);      // exactly 4
  EXPECT_EQ(expert_capacity(17, 2, 1.0, 8), 8);      // ceil(4.25)=5 -> 8
  EXPECT_EQ(expert_capacity(1, 1, 0.01, 64), 4);     // at least one slot, rounded to 4
}

TEST(Router, TopOneChoicesTakeSlotsBeforeTopTwo) {
  // One group, 4 tokens, k=2, 3 experts. Choices (top-1, top-2):
  // t0:(0,1) t1:(1,0) t2:(0,2) t3:(0,1)
  at::Tensor e = longs({0, 1, 1, 0, 0, 2, 0, 1}, {1, 4, 2});
  at::Tensor g = floats({.5, .3, .6, .2, .7, .1, .4, .3}, {1, 4, 2});
  auto [pos, keep] = assign_slots(e, g, 3, /*capacity=*/3, /*bpr=*/false);
  // Expert 0 top-1: t0=0, t2=1, t3=2; then t1's top-2 choice of expert 0 -> 3 (dropped).
  // Expert 1 top-1: t1=0; top-2: t0=1, t3=2. Expert 2 top-2: t2=0.
  EXPECT_TRUE(at::equal(pos, longs({0, 1, 0, 3, 1, 0, 2, 2}, {1, 4, 2})));
  EXPECT_TRUE(at::equal(keep, pos < 3));
  EXPECT_FALSE(keep[0][1][1].item<bool>());
}

TEST(Router, BatchPrioritizedRoutingOrdersByTopGate) {
  // All tokens pick expert 0 first; capacity 4 keeps the 4 with the largest top-1 gate under BPR.
  at::Tensor e = longs({0, 0, 0, 0, 0, 0}, {1, 6, 1});
  at::Tensor g = floats({.1f, .9f, .3f, .8f, .2f, .7f}, {1, 6, 1});
  auto [pos_plain, keep_plain] = assign_slots(e, g, 2, 4, false);
  EXPECT_TRUE(at::equal(pos_plain.flatten(), longs({0, 1, 2, 3, 4, 5}, {6})));
  auto [pos, keep] = assign_slots(e, g, 2, 4, true);
  EXPECT_TRUE(at::equal(pos.flatten(), longs({5, 0, 3, 1, 4, 2}, {6})));
  EXPECT_TRUE(at::equal(keep.flatten().to(at::kLong), longs({0, 1, 1, 1, 0, 1}, {6})));
}

TEST(Router, GroupsAreIndependent) {
  at::Tensor e = longs({0, 0, 0, 0}, {2, 2, 1});
  at::Tensor g = floats({.5, .5, .5, .5}, {2, 2, 1});
  auto [pos, keep] = assign_slots(e, g, 1, 4, false);
  EXPECT_TRUE(at::equal(pos.flatten(), longs({0, 1, 0, 1}, {4})));
}

TEST(Router, ImportanceLossByHand) {
  // importance = [1.3, 0.7]; mean 1.0, population std 0.3 -> CV^2 = 0.09.
  at::Tensor p = floats({.7f, .3f, .6f, .4f}, {1, 2, 2});
  EXPECT_NEAR(importance_loss(p).item<double>(), 0.09, 1e-6);
  // Two groups sum their losses.
  EXPECT_NEAR(importance_loss(at::cat({p, p}, 0)).item<double>(), 0.18, 1e-6);
}

TEST(Router, LoadLossByHand) {
  // One group, 2 tokens, 3 experts, k=1, noise std 0.5.
  const std::vector<float> logits = {1.0f, 0.0f, -1.0f, 0.2f, 0.4f, 0.1f};
  const std::vector<float> noisy = {1.1f, 0.3f, -0.8f, 0.0f, 0.9f, 0.2f};
  const double sd = 0.5;
  // Threshold = largest noisy logit of each token; p = 1 - Phi((t - l)/sd).
  double pm[3] = {0, 0, 0};
  for (int t = 0; t < 2; ++t) {
    const double th = std::max({noisy[3 * t], noisy[3 * t + 1], noisy[3 * t + 2]});
    for (int e = 0; e < 3; ++e) {
      const double z = (th - logits[3 * t + e]) / sd;
      pm[e] += (1.0 - 0.5 * std::erfc(-z / std::sqrt(2.0))) / 2.0;
    }
  }
  const double mean = (pm[0] + pm[1] + pm[2]) / 3;
  double var = 0;
  for (double v : pm) var += (v - mean) * (v - mean) / 3;
  const double expected = var / (mean * mean);
  const double got = load_loss(floats(logits, {1, 2, 3}), floats(noisy, {1, 2, 3}), sd, 1).item<double>();
  EXPECT_NEAR(got, expected, 1e-5);
  EXPECT_GT(expected, 0.01);  // the case is not degenerate
}

TEST(Router, ForwardShapesAndGatesAreProbabilities) {
  at::manual_seed(0);
  Router r(8, RouterOptions{4, 2, 1.0, 1.0, false});
  at::Tensor x = at::randn({3, 10, 8});
  Routing out = r->forward(x, /*train=*/false, {}, TorchSelector());
  EXPECT_EQ(out.expert.sizes(), (std::vector<int64_t>{30, 2}));
  EXPECT_EQ(out.capacity, 8);  // ceil(10*2*1/4)=5 -> 8
  // Gates are the softmax probabilities of the chosen experts, not renormalised.
  at::Tensor picked = out.probs.gather(1, out.expert);
  EXPECT_TRUE(at::allclose(picked, out.gate));
  EXPECT_TRUE((out.gate.sum(1) < 1.0 + 1e-6).all().item<bool>());
  EXPECT_EQ(out.load_loss.item<double>(), 0.0);  // no noise outside training
  // Training noise is a function of the group seed alone.
  Routing a = r->forward(x, true, {1, 2, 3}, TorchSelector());
  Routing b = r->forward(x.narrow(0, 1, 1), true, {2}, TorchSelector());
  EXPECT_TRUE(at::equal(a.expert.narrow(0, 10, 10), b.expert));
}

TEST(Router, NoiseIsTheSameOnAnyNumberOfThreads) {
  // The groups' noise is drawn in parallel, each group from its own generator: the
  // result must equal drawing them one by one (randn with the group's generator).
  at::manual_seed(0);
  const int E = 8;
  Router r(16, RouterOptions{E, 2, 1.0, 1.0, false});
  at::Tensor x = at::randn({6, 20, 16});
  const std::vector<uint64_t> seeds{11, 12, 13, 14, 15, 16};
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  Routing one = r->forward(x, true, seeds, TorchSelector());
  at::set_num_threads(std::max(threads, 3));
  Routing many = r->forward(x, true, seeds, TorchSelector());
  at::set_num_threads(threads);
  EXPECT_TRUE(at::equal(one.probs, many.probs));
  EXPECT_TRUE(at::equal(one.load_loss, many.load_loss));
  // Against the definition: softmax(logits + randn(S, E, gen(seed)) / E) per group.
  at::Tensor logits = at::matmul(x, r->weight).detach();
  for (int64_t g = 0; g < 6; ++g) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seeds[g]);
    at::Tensor expect = at::softmax(logits[g] + at::randn({20, E}, gen) / E, -1);
    EXPECT_TRUE(at::allclose(many.probs.narrow(0, g * 20, 20), expect, 0, 1e-6)) << "group " << g;
  }
}

}  // namespace
}  // namespace moeprune
