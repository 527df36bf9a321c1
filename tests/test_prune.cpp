// Pruning in one process: each criterion on router weights and counts set by the
// test, global vs per-layer selection, the min-experts constraint and bad targets,
// drop and zero routing against outputs computed by hand, and the rebalancer.
#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "prune/plan.h"
#include "prune/rebalance.h"

namespace moeprune {
namespace {

std::map<int, std::vector<int>> ids4(std::initializer_list<int> blocks) {
  std::map<int, std::vector<int>> m;
  for (int b : blocks) m[b] = {0, 1, 2, 3};
  return m;
}

TEST(Criteria, RouterNormChangeAndDelta) {
  // Columns: e0 (3,0)->(3,4): change +2, delta 4; e1 (0,1)->(0,0.5): -0.5, 0.5;
  // e2 (1,0)->(0,1): 0, sqrt 2; e3 unchanged.
  at::Tensor ref = at::tensor({3.0, 0.0, 1.0, 2.0, 0.0, 1.0, 0.0, 0.0}).reshape({2, 4});
  at::Tensor now = at::tensor({3.0, 0.0, 0.0, 2.0, 4.0, 0.5, 1.0, 0.0}).reshape({2, 4});
  auto s = expert_scores(Criterion::RouterNormChange, {{1, ref}}, {{1, now}}, {}, ids4({1}), 0);
  ASSERT_EQ(s.size(), 1u);
  EXPECT_NEAR(s[0].scores[0], 2.0, 1e-12);
  EXPECT_NEAR(s[0].scores[1], -0.5, 1e-12);
  EXPECT_NEAR(s[0].scores[2], 0.0, 1e-12);
  EXPECT_NEAR(s[0].scores[3], 0.0, 1e-12);
  s = expert_scores(Criterion::RouterDelta, {{1, ref}}, {{1, now}}, {}, ids4({1}), 0);
  EXPECT_NEAR(s[0].scores[0], 4.0, 1e-12);
  EXPECT_NEAR(s[0].scores[1], 0.5, 1e-12);
  EXPECT_NEAR(s[0].scores[2], std::sqrt(2.0), 1e-12);
}

TEST(Criteria, CountsRandomAndUnknown) {
  LayerStats st;
  st.assigned = {5, 1, 9, 0};
  st.kept = {5, 1, 8, 0};
  st.soft = {0.5, 2.5, 1.0, 0.25};
  auto hh = expert_scores(Criterion::HeavyHitter, {}, {}, {{3, st}}, ids4({3}), 0);
  EXPECT_EQ(hh[0].scores, (std::vector<double>{5, 1, 9, 0}));
  auto sc = expert_scores(Criterion::SoftCount, {}, {}, {{3, st}}, ids4({3}), 0);
  EXPECT_EQ(sc[0].scores, (std::vector<double>{0.5, 2.5, 1.0, 0.25}));
  auto r1 = expert_scores(Criterion::Random, {}, {}, {}, ids4({3}), 7);
  auto r2 = expert_scores(Criterion::Random, {}, {}, {}, ids4({3}), 7);
  auto r3 = expert_scores(Criterion::Random, {}, {}, {}, ids4({3}), 8);
  EXPECT_EQ(r1[0].scores, r2[0].scores);
  EXPECT_NE(r1[0].scores, r3[0].scores);
  EXPECT_THROW(parse_choice<Criterion>("loudest", "prune.criterion"), UserError);
  EXPECT_THROW(expert_scores(Criterion::RouterDelta, {}, {}, {}, ids4({3}), 0), UserError);  // no reference
}

std::vector<LayerScores> two_layers() {
  // Layer 1 spreads widely, layer 3 narrowly: raw values favour pruning layer 3,
  // per-layer z-scores do not.
  return {LayerScores{1, {0, 1, 2, 3}, {-10, 0, 10, 20}}, LayerScores{3, {0, 1, 2, 3}, {1.0, 1.1, 1.2, 1.3}}};
}

TEST(Selection, PerLayerPrunesTheSameNumberInEachLayer) {
  PruneConfig c;
  c.scope = PruneScope::PerLayer;
  c.ratio = 0.5;
  PrunePlan p = make_plan(two_layers(), c, 1);
  EXPECT_EQ(p.layers[0].pruned, (std::vector<int>{0, 1}));
  EXPECT_EQ(p.layers[1].pruned, (std::vector<int>{0, 1}));
  EXPECT_EQ(p.layers[1].kept, (std::vector<int>{2, 3}));
}

TEST(Selection, GlobalRanksPerLayerZScores) {
  PruneConfig c;
  c.scope = PruneScope::Global;
  c.count = 3;
  std::vector<LayerScores> s = two_layers();
  s[1].scores = {1.0, 1.29, 1.3, 1.31};  // e0 is far below its layer: z = -1.73
  PrunePlan p = make_plan(s, c, 1);
  // z-scores: layer 1: -1.34, -0.45, 0.45, 1.34; layer 3: -1.73, 0.56, 0.58, 0.60
  EXPECT_EQ(p.layers[1].pruned, (std::vector<int>{0}));
  EXPECT_EQ(p.layers[0].pruned, (std::vector<int>{0, 1}));
  EXPECT_EQ(p.total_pruned(), 3);
  EXPECT_NEAR(p.layers[1].normalized[0], -0.225 / std::sqrt(0.0677 / 4), 1e-9);
}

TEST(Selection, MinExpertsAndEligibleLayers) {
  PruneConfig c;
  c.scope = PruneScope::Global;
  c.count = 5;
  c.min_experts = 2;  // each layer keeps >= 2: at most 2 + 2 prunable
  EXPECT_THROW(make_plan(two_layers(), c, 1), UserError);
  c.count = 4;
  PrunePlan p = make_plan(two_layers(), c, 1);
  EXPECT_EQ(p.layers[0].kept.size(), 2u);
  EXPECT_EQ(p.layers[1].kept.size(), 2u);
  // top_k is a floor too.
  PruneConfig r;
  r.scope = PruneScope::PerLayer;
  r.ratio = 0.75;
  try {
    make_plan(two_layers(), r, 2);
    FAIL() << "pruning 3 of 4 leaves 1 < top_k = 2";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("would leave fewer than max(top_k=2"), std::string::npos) << e.what();
  }
  PruneConfig only;
  only.scope = PruneScope::PerLayer;
  only.ratio = 0.5;
  only.layers = {3};
  PrunePlan q = make_plan(two_layers(), only, 1);
  EXPECT_TRUE(q.layers[0].pruned.empty());
  EXPECT_EQ(q.layers[1].pruned.size(), 2u);
}

TEST(Selection, HashDependsOnKeptExperts) {
  PruneConfig c;
  c.scope = PruneScope::PerLayer;
  c.ratio = 0.5;
  PrunePlan a = make_plan(two_layers(), c, 1), b = a;
  EXPECT_EQ(a.hash(), b.hash());
  std::swap(b.layers[0].kept[0], b.layers[0].pruned[0]);
  EXPECT_NE(a.hash(), b.hash());
}

// Expert id e of a hidden-2 bank computes w1 = I, b1 = 0, w2 = (e+1) I, b2 = 0, so
// out = gelu_tanh(x) * (e+1).
void scaled_identity_experts(ExpertBankImpl& bank) {
  at::NoGradGuard ng;
  for (size_t i = 0; i < bank.expert_ids().size(); ++i) {
    const double scale = bank.expert_ids()[i] + 1.0;
    bank.w1[static_cast<int64_t>(i)].copy_(at::eye(2));
    bank.b1[static_cast<int64_t>(i)].zero_();
    bank.w2[static_cast<int64_t>(i)].copy_(at::eye(2) * scale);
    bank.b2[static_cast<int64_t>(i)].zero_();
  }
}

// One MoE layer with hand-set weights: 4 experts, hidden 2, identity-like experts.
struct HandLayer {
  SelfCommunicator comm;
  ModelConfig cfg;
  MoeLayer layer{nullptr};
  HandLayer(const std::map<int, std::vector<int>>& kept, PrunedRouting routing, int k) {
    cfg.hidden = 2;
    cfg.mlp_dim = 2;
    cfg.num_heads = 1;
    cfg.moe.num_experts = 4;
    cfg.moe.top_k = k;
    cfg.moe.group_size = 1;
    cfg.moe.capacity_factor = 100;  // no capacity drops: routing alone decides
    cfg.kept_experts = kept;
    cfg.pruned_routing = routing;
    const int n = static_cast<int>(cfg.layer_experts(1).size());
    layer = MoeLayer(cfg, 1, Placement::contiguous(n, 1), comm, 0);
    at::NoGradGuard ng;
    // Router column of expert id e: (e+1, -e) -> logits x0*(e+1) - x1*e.
    auto& w = layer->routers[0]->as<RouterImpl>()->weight;
    const auto& cols = layer->router_column_ids(0);
    for (size_t j = 0; j < cols.size(); ++j) {
      w[0][static_cast<int64_t>(j)] = cols[j] + 1.0;
      w[1][static_cast<int64_t>(j)] = -cols[j];
    }
    scaled_identity_experts(*layer->experts);
  }
  at::Tensor run(const at::Tensor& x) {
    ForwardContext ctx;
    return layer->forward(x.view({-1, 1, 2}), ctx).view({-1, 2});
  }
};

// Expected output by hand: softmax over the given experts' logits, top-k of the
// `candidates`, contributions of the `alive` ones.
at::Tensor by_hand(const at::Tensor& x, const std::vector<int>& softmax_over, const std::vector<int>& alive, int k) {
  at::Tensor out = at::zeros_like(x);
  for (int64_t t = 0; t < x.size(0); ++t) {
    const double x0 = x[t][0].item<double>(), x1 = x[t][1].item<double>();
    std::vector<std::pair<double, int>> p;
    double z = 0;
    for (int e : softmax_over) z += std::exp(x0 * (e + 1) - x1 * e);
    for (int e : softmax_over) p.push_back({std::exp(x0 * (e + 1) - x1 * e) / z, e});
    std::sort(p.begin(), p.end(), [](auto& a, auto& b) { return a.first > b.first; });
    at::Tensor g = at::gelu(x[t], "tanh");
    for (int j = 0; j < k; ++j)
      if (std::find(alive.begin(), alive.end(), p[j].second) != alive.end())
        out[t] += g * (p[j].first * (p[j].second + 1));
  }
  return out;
}

// E3 pruned unevenly under drop routing: member 0 keeps 1 of its 4 experts, member 1
// all 4, so member 0's capacity (16 per group) is 4x member 1's. The dispatcher sorts
// choices by (expert, group, capacity slot) keyed with the layer's capacity; keyed with
// the last member's (4), member 0's slots >= 12 ran into the next expert's keys and
// some of its tokens were computed by member 1's experts. Member 0's single expert
// takes all its tokens (gate 1): out = gelu(x) * 1 exactly, with its tokens in full.
TEST(PrunedRouting, UnevenlyPrunedEnsembleMembersKeepTheirTokens) {
  SelfCommunicator comm;
  ModelConfig cfg;
  cfg.hidden = 2;
  cfg.mlp_dim = 2;
  cfg.num_heads = 1;
  cfg.moe.num_experts = 8;
  cfg.moe.ensemble_size = 2;
  cfg.moe.top_k = 1;
  cfg.moe.group_size = 16;
  cfg.moe.capacity_factor = 1.0;
  cfg.kept_experts = {{1, {0, 4, 5, 6, 7}}};
  cfg.pruned_routing = PrunedRouting::Drop;
  MoeLayer layer(cfg, 1, Placement::contiguous(5, 1), comm, 0);
  scaled_identity_experts(*layer->experts);
  at::manual_seed(3);
  const at::Tensor x = at::randn({16, 2});  // one group of 16 one-token images per member
  ForwardContext ctx;
  const at::Tensor out = layer->forward(at::cat({x, x}).view({32, 1, 2}), ctx).view({32, 2});
  EXPECT_TRUE(at::allclose(out.narrow(0, 0, 16), at::gelu(x, "tanh"), 1e-6, 1e-6))
      << "member 0's tokens were not all computed by its expert";
}

TEST(PrunedRouting, DropAndZeroAgainstHandComputedOutputs) {
  at::Tensor x = at::tensor({0.3, -0.2, 1.0, 0.5, -0.7, 0.1, 0.2, 0.9, 2.0, -1.0}).to(at::kFloat).reshape({5, 2});
  for (int k : {1, 2}) {
    HandLayer full({}, PrunedRouting::Drop, k);
    EXPECT_TRUE(at::allclose(full.run(x), by_hand(x, {0, 1, 2, 3}, {0, 1, 2, 3}, k), 1e-5, 1e-6)) << "k=" << k;
    HandLayer drop({{1, {0, 2}}}, PrunedRouting::Drop, k);  // experts 1 and 3 pruned
    EXPECT_EQ(drop.layer->routers[0]->as<RouterImpl>()->weight.size(1), 2);
    EXPECT_TRUE(at::allclose(drop.run(x), by_hand(x, {0, 2}, {0, 2}, k), 1e-5, 1e-6)) << "drop k=" << k;
    HandLayer zero({{1, {0, 2}}}, PrunedRouting::Zero, k);
    EXPECT_EQ(zero.layer->routers[0]->as<RouterImpl>()->weight.size(1), 4);
    EXPECT_TRUE(at::allclose(zero.run(x), by_hand(x, {0, 1, 2, 3}, {0, 2}, k), 1e-5, 1e-6)) << "zero k=" << k;
    // The two differ: some token's top choice is a pruned expert.
    EXPECT_FALSE(at::allclose(drop.run(x), zero.run(x)));
  }
}

TEST(Rebalance, EvenMemoryLowLoadFewMoves) {
  // 6 experts on 3 ranks, 2 each; loads 9,1,1,1,1,9 placed badly (both 9s on rank 0).
  const std::vector<double> loads{9, 1, 1, 1, 9, 1};
  const std::vector<int> now{0, 1, 1, 2, 0, 2};
  EXPECT_NEAR(load_imbalance(loads, now, 3), 18.0 / (22.0 / 3), 1e-12);
  const auto r = balanced_placement(loads, now, 3);
  std::vector<int> count(3, 0);
  for (int x : r) ++count[x];
  EXPECT_EQ(count, (std::vector<int>{2, 2, 2}));
  EXPECT_NEAR(load_imbalance(loads, r, 3), 10.0 / (22.0 / 3), 1e-12);  // best possible: 9+1 on two ranks
  // Already balanced: nothing moves.
  const std::vector<double> even{1, 1, 1, 1};
  const std::vector<int> at{0, 0, 1, 1};
  EXPECT_EQ(balanced_placement(even, at, 2), at);
  // Fewer experts than ranks: some ranks hold none.
  const auto few = balanced_placement({3, 1}, {0, 0}, 4);
  EXPECT_NE(few[0], few[1]);
}

// Checks a replicated placement: every expert on >= 1 distinct ranks, at most
// max_copies per rank; returns its imbalance.
double checked(const std::vector<std::vector<int>>& p, const std::vector<double>& loads, int W, int max_copies) {
  std::vector<int> count(static_cast<size_t>(W), 0);
  EXPECT_EQ(p.size(), loads.size());
  for (const auto& rs : p) {
    EXPECT_FALSE(rs.empty());
    for (size_t i = 0; i < rs.size(); ++i) {
      EXPECT_TRUE(rs[i] >= 0 && rs[i] < W);
      EXPECT_EQ(std::count(rs.begin(), rs.end(), rs[i]), 1) << "two copies on rank " << rs[i];
      ++count[static_cast<size_t>(rs[i])];
    }
  }
  for (int c : count) EXPECT_LE(c, max_copies);
  return load_imbalance(loads, p, W);
}

TEST(Rebalance, ReplicasOfHotExpertsMeetTheTarget) {
  // 3 survivors on 2 ranks (a layer that kept an odd count): without replicas the
  // best is 60 | 25 + 15 = 1.2; a rank held 4 experts before pruning, so 4 copies fit.
  const std::vector<double> loads{60, 25, 15};
  EXPECT_NEAR(load_imbalance(loads, balanced_placement(loads, {0, 1, 0}, 2), 2), 60.0 / 50.0, 1e-12);
  const auto p = replicated_placement(loads, {0, 1, 0}, 2, 4, 1.05);
  EXPECT_LE(checked(p, loads, 2, 4), 1.05);
  EXPECT_EQ(p[0].size(), 2u) << "the hottest expert is the one replicated";
  EXPECT_EQ(p[1].front(), 1) << "a primary stays on its current rank";
  // A replica's load counts by share: expert 0 on both ranks = 30 each.
  EXPECT_NEAR(load_imbalance(loads, std::vector<std::vector<int>>{{0, 1}, {1}, {0}}, 2), 55.0 / 50.0, 1e-12);

  // Fewer survivors than ranks: copies fill the empty ranks.
  const std::vector<double> two{30, 10};
  const auto q = replicated_placement(two, {0, 1}, 4, 2, 1.05);
  EXPECT_LE(checked(q, two, 4, 2), 1.10);
  EXPECT_NEAR(load_imbalance(two, balanced_placement(two, {0, 1}, 4), 4), 30.0 / 10.0, 1e-12);

  // No room (as many copies per rank as survivors need): balanced_placement's result.
  const std::vector<double> four{40, 10, 10, 10};
  const auto none = replicated_placement(four, {0, 0, 1, 1}, 2, 2, 1.0);
  const auto plain = balanced_placement(four, {0, 0, 1, 1}, 2);
  for (size_t e = 0; e < four.size(); ++e) EXPECT_EQ(none[e], std::vector<int>{plain[e]});
  // Balanced already: no replica is added.
  const auto flat = replicated_placement({5, 5, 5, 5}, {0, 0, 1, 1}, 2, 4, 1.05);
  for (const auto& rs : flat) EXPECT_EQ(rs.size(), 1u);

  // Memory: what pruning freed (8 experts on 2 ranks before: 4 per rank), or the bound.
  EXPECT_EQ(replica_copies_per_rank(8, 3, 2, 0, 4, 16, 24), 4);
  const double copy_mib = expert_copy_bytes(16, 24) / (1 << 20);
  EXPECT_EQ(replica_copies_per_rank(8, 3, 2, 4 * 3.5 * copy_mib, 4, 16, 24), 2 + 3);
}

}  // namespace
}  // namespace moeprune
