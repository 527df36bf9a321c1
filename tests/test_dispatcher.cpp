// The dispatcher contract in one process, for every backend (torch ops and the
// kernels' host path): the permutation to expert-contiguous order and its inverse
// form a bijection over the kept choices, rows are ordered by (expert, group,
// slot), counts add up, combine weighs by the kept gates, and uneven and empty
// experts are handled. The multi-rank half of the contract is MoeLayerOracle
// (test_oracle.cpp), which runs every backend too.
#include <gtest/gtest.h>

#include <limits>
#include <set>

#include "dist/communicator.h"
#include "model/dispatcher.h"

namespace moeprune {
namespace {

struct Case {
  at::Tensor expert, gate, keep, group, position;
  RoutedChoices choices() const { return {expert, gate, keep, group, position, 24, 2}; }
};

// 12 tokens, k=2, 5 experts; expert 4 is never chosen, expert 0 is chosen often.
Case make_case() {
  at::Tensor expert = at::tensor({0, 1, 0, 2, 1, 0, 3, 0, 0, 1, 2, 0, 0, 3, 1, 2, 0, 2, 3, 1, 0, 1, 2, 3},
                                 at::kLong).reshape({12, 2});
  at::Tensor gate = at::linspace(0.05, 0.6, 24).reshape({12, 2});
  at::Tensor keep = at::ones({12, 2}, at::kBool);
  keep[3][1] = false;
  keep[7][0] = false;
  keep[10][1] = false;
  at::Tensor group = at::arange(12, at::kLong).floor_divide(6).unsqueeze(1).expand({12, 2}).contiguous();
  // Slots run against token order inside each group, so that (expert, group, slot)
  // order differs from (expert, group, token) order.
  at::Tensor position = (23 - at::arange(24, at::kLong)).reshape({12, 2});
  return {expert, gate, keep, group, position};
}

class DispatcherContract : public ::testing::TestWithParam<DispatcherKind> {
 protected:
  SelfCommunicator comm;
  Placement pl = Placement::contiguous(5, 1);
  std::unique_ptr<TokenDispatcher> d = make_dispatcher(GetParam(), c10::Device(c10::kCPU), comm, pl);
};

TEST_P(DispatcherContract, BackendIsTheOneAskedFor) {
  EXPECT_EQ(d->name(), name_of(GetParam()));
}

TEST_P(DispatcherContract, PermutationIsABijectionOverKeptChoices) {
  Case c = make_case();
  auto p = d->plan(c.choices());
  const int64_t kept = c.keep.sum().item<int64_t>();
  ASSERT_EQ(p->token.size(0), kept);
  // Every kept (token, expert) pair appears exactly once.
  std::multiset<std::pair<int64_t, int64_t>> want, got;
  for (int64_t t = 0; t < 12; ++t)
    for (int j = 0; j < 2; ++j)
      if (c.keep[t][j].item<bool>()) want.insert({t, c.expert[t][j].item<int64_t>()});
  for (int64_t i = 0; i < kept; ++i) got.insert({p->token[i].item<int64_t>(), p->send_expert[i].item<int64_t>()});
  EXPECT_EQ(want, got);
  // Expert-contiguous, counts add up, the unchosen expert has zero rows.
  EXPECT_TRUE(at::equal(p->send_expert, std::get<0>(p->send_expert.sort())));
  int64_t total = 0;
  for (int64_t n : p->expert_counts) total += n;
  EXPECT_EQ(total, kept);
  EXPECT_EQ(p->expert_counts[4], 0);
  EXPECT_EQ(p->expert_counts, p->send_counts);
}

TEST_P(DispatcherContract, CombineOfDispatchWeighsByKeptGates) {
  Case c = make_case();
  auto p = d->plan(c.choices());
  at::Tensor x = at::randn({12, 3});
  at::Tensor y = d->combine(d->dispatch(x, *p), *p);  // identity experts
  at::Tensor weight = (c.gate * c.keep.to(at::kFloat)).sum(1, true);
  EXPECT_TRUE(at::allclose(y, x * weight, 1e-6, 1e-6));
}

TEST_P(DispatcherContract, RowsOrderedByExpertThenGroupThenSlot) {
  Case c = make_case();
  auto p = d->plan(c.choices());
  at::Tensor flat_group = c.group.reshape({-1}).index_select(0, p->choice);
  at::Tensor flat_position = c.position.reshape({-1}).index_select(0, p->choice);
  EXPECT_TRUE(at::equal(p->token, p->choice.floor_divide(2)));
  at::Tensor key = (p->send_expert * 100 + flat_group) * 100 + flat_position;
  EXPECT_TRUE(at::equal(key, std::get<0>(key.sort())));
  // The key really orders by slot within (expert, group): token order would not.
  at::Tensor by_token = (p->send_expert * 100 + flat_group) * 100 + p->token;
  EXPECT_FALSE(at::equal(by_token, std::get<0>(by_token.sort())));
}

TEST_P(DispatcherContract, AllChoicesDropped) {
  Case c = make_case();
  c.keep.zero_();
  auto p = d->plan(c.choices());
  EXPECT_EQ(p->token.size(0), 0);
  at::Tensor x = at::randn({12, 3}, at::requires_grad());
  at::Tensor y = d->combine(d->dispatch(x, *p), *p);
  EXPECT_TRUE(at::equal(y, at::zeros({12, 3})));  // residual only: zero MoE output
}

// Host plans order the kept choices without a sort where each (expert, group)
// holds positions 0 .. n-1 (how slots are handed out), and sort otherwise: either
// way the order is that of the sort key (expert slot, group, position). Random
// choices with slots handed out in a random priority order, some dropped; then the
// same with gaps in the positions (the sorting path).
TEST_P(DispatcherContract, KeptChoicesInKeyOrderWithAndWithoutGaps) {
  const int64_t N = 300, K = 2, E = 5, G = 4;
  at::manual_seed(11);
  at::Tensor expert = at::randint(0, E, {N, K}, at::kLong);
  at::Tensor group = at::arange(N, at::kLong).floor_divide(N / G).unsqueeze(1).expand({N, K});
  at::Tensor keep = at::rand({N, K}) > 0.15;
  at::Tensor gate = at::rand({N, K});
  at::Tensor priority = at::randperm(N * K, at::kLong);
  // Choice-major views (as the selectors return them; strides (1, N)) and a group
  // broadcast over k (stride 0) must read as the same choices.
  const auto choice_major = [&](const at::Tensor& t) { return t.t().contiguous().t(); };
  for (bool gaps : {false, true})
    for (bool views : {false, true}) {
      at::Tensor position = at::zeros({N * K}, at::kLong);
      std::vector<int64_t> next(static_cast<size_t>(E * G), 0);
      const int64_t* pr = priority.data_ptr<int64_t>();
      for (int64_t q = 0; q < N * K; ++q) {
        const int64_t i = pr[q];
        if (!keep.reshape({-1})[i].item<bool>()) continue;
        const auto b = static_cast<size_t>(expert.reshape({-1})[i].item<int64_t>() * G + group.reshape({-1})[i].item<int64_t>());
        position[i] = next[b];
        next[b] += gaps ? 2 : 1;
      }
      const auto in = [&](const at::Tensor& t) { return views ? choice_major(t) : t.contiguous(); };
      const RoutedChoices rc{in(expert), in(gate), in(keep), views ? group : group.contiguous(),
                             in(position.reshape({N, K})), 2 * N * K, G};
      const auto p = d->plan(rc);
      // The counting pass itself (the plan would hide a wrong pass behind its sort):
      // taken for positions 0 .. n-1 in either layout, declined with gaps.
      const detail::HostOrder h = detail::kept_in_key_order(at::arange(E, at::kLong), rc.expert, rc.group,
                                                            rc.position, rc.keep, G, K, static_cast<int>(E));
      EXPECT_EQ(h.order.defined(), !gaps);
      const std::string what = std::string(gaps ? "with gaps" : "positions 0 .. n-1") + (views ? ", views" : "");
      at::Tensor key = (expert.reshape({-1}) * G + group.reshape({-1})) * (2 * N * K) + position;
      key = key.masked_fill(keep.reshape({-1}).logical_not(), std::numeric_limits<int64_t>::max());
      const at::Tensor want = std::get<1>(key.sort(true, 0, false)).narrow(0, 0, keep.sum().item<int64_t>());
      EXPECT_TRUE(at::equal(p->choice, want)) << what;
      EXPECT_TRUE(at::equal(p->token, want.floor_divide(K))) << what;
      EXPECT_TRUE(at::equal(p->send_expert, expert.reshape({-1}).index_select(0, want))) << what;
      EXPECT_TRUE(at::equal(p->gate, gate.reshape({-1}).index_select(0, want))) << what;
      const at::Tensor counts = at::bincount(expert.reshape({-1}).masked_select(keep.reshape({-1})), {}, E);
      EXPECT_EQ(p->send_counts, std::vector<int64_t>(counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + E))
          << what;
      if (h.order.defined()) {
        EXPECT_TRUE(at::equal(h.order, want)) << what;
        EXPECT_TRUE(at::equal(h.token, want.floor_divide(K))) << what;
        EXPECT_TRUE(at::equal(h.expert, expert.reshape({-1}).index_select(0, want))) << what;
        EXPECT_EQ(h.counts, p->send_counts) << what;
      }
    }
}

TEST_P(DispatcherContract, RowIndexOutsideTheInputIsAnErrorNotARead) {
  auto p = d->plan(make_case().choices());
  const at::Tensor x = at::randn({12, 8});
  p->token = p->token.clone();
  p->token[3] = 12;  // one past the last row of x
  try {
    d->dispatch(x, *p);
    if (GetParam() == DispatcherKind::Kernels) ADD_FAILURE() << "a row index outside x was read";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("12"), std::string::npos) << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, DispatcherContract,
                         ::testing::Values(DispatcherKind::Torch, DispatcherKind::Kernels),
                         [](const auto& info) { return str(info.param); });

TEST(Placement, ContiguousAndErrors) {
  Placement p = Placement::contiguous(8, 3);
  EXPECT_EQ(p.local_experts(0), (std::vector<int>{0, 1}));
  EXPECT_EQ(p.local_experts(1), (std::vector<int>{2, 3, 4}));
  EXPECT_EQ(p.local_experts(2), (std::vector<int>{5, 6, 7}));
  EXPECT_THROW(Placement::contiguous(2, 4), UserError);
  Placement s({1, 0, 1, 0}, 2);
  EXPECT_EQ(s.send_order(), (std::vector<int>{1, 3, 0, 2}));
  EXPECT_EQ(s.send_slot(0), 2);
  EXPECT_THROW(Placement({0, 2}, 2), UserError);
}

TEST(Placement, ReplicasAreCopySlots) {
  // Expert 0 on ranks 1 (primary) and 0, expert 1 on 0, expert 2 on 1, 0 and 2.
  Placement p(std::vector<std::vector<int>>{{1, 0}, {0}, {1, 0, 2}}, 3);
  EXPECT_TRUE(p.has_replicas());
  EXPECT_EQ(p.num_experts(), 3);
  EXPECT_EQ(p.num_copies(), 6);
  EXPECT_EQ(p.rank_of(0), 1);
  EXPECT_EQ(p.replicas(2), 3);
  EXPECT_EQ(p.local_experts(0), (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(p.local_experts(2), (std::vector<int>{2}));
  EXPECT_EQ(p.first_copy(1), 2);
  EXPECT_EQ(p.copy_expert(5), 2);
  const Placement& c = p.copies();  // copy slots 0..5 on ranks 1,0,0,1,0,2
  EXPECT_EQ(c.num_experts(), 6);
  EXPECT_FALSE(c.has_replicas());
  EXPECT_EQ(c.expert_rank(), (std::vector<int>{1, 0, 0, 1, 0, 2}));
  // A rank's copies in copy-slot order are its experts in id order (its bank's rows).
  std::vector<int> ids;
  for (int s : c.local_experts(0)) ids.push_back(p.copy_expert(s));
  EXPECT_EQ(ids, p.local_experts(0));
  const Placement plain = Placement::contiguous(4, 2);
  EXPECT_EQ(&plain.copies(), &plain);
  EXPECT_THROW(Placement(std::vector<std::vector<int>>{{0, 0}}, 2), UserError);  // two copies on one rank
  EXPECT_THROW(Placement(std::vector<std::vector<int>>{{}}, 2), UserError);      // on no rank
}

TEST(Comm, SelfBlocksPairInOrderAndMergeAdjacentRuns) {
  // Rank 1 of 3 sends itself blocks {0..1}, {2..4}, {7}: the first two are adjacent on both
  // sides (one copy), the third lands elsewhere (a second copy); blocks to others are left,
  // empty blocks pair with nothing.
  at::Tensor send = at::arange(8, at::kFloat).reshape({8, 1});
  at::Tensor recv = at::full({9, 1}, -1.f);
  const std::vector<RowBlock> sb{{1, 0, 2}, {0, 5, 2}, {1, 6, 0}, {1, 2, 3}, {2, 9, 0}, {1, 7, 1}};  // one empty
  const std::vector<RowBlock> rb{{1, 3, 2}, {2, 0, 3}, {1, 5, 3}, {1, 8, 1}};
  EXPECT_EQ(copy_self_blocks(send, sb, recv, rb, 1), 2);
  const std::vector<float> want{-1, -1, -1, 0, 1, 2, 3, 4, 7};
  for (int i = 0; i < 9; ++i) EXPECT_EQ(recv[i][0].item<float>(), want[i]) << "row " << i;
  // Self blocks that do not pair up are refused with the counts named.
  EXPECT_THROW(copy_self_blocks(send, sb, recv, {{1, 3, 2}}, 1), std::invalid_argument);
  EXPECT_THROW(copy_self_blocks(send, {{1, 0, 2}}, recv, {{1, 0, 3}}, 1), std::invalid_argument);
  // SelfCommunicator goes through it: the same pairing, one process.
  SelfCommunicator self;
  at::Tensor got = self.all_to_all_blocks(send, {{0, 4, 2}, {0, 0, 3}}, 5, {{0, 0, 2}, {0, 2, 3}});
  EXPECT_TRUE(at::equal(got.flatten(), at::tensor(std::vector<float>{4, 5, 0, 1, 2})));
}

}  // namespace
}  // namespace moeprune
