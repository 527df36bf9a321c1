// Dispatcher in one process: the permutation to expert-contiguous order and its
// inverse form a bijection over the kept choices, counts add up, and uneven and
// empty experts are handled.
#include <gtest/gtest.h>

#include <set>

#include "model/dispatcher.h"

namespace moeprune {
namespace {

struct Case {
  at::Tensor expert, gate, keep, group, position;
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
  at::Tensor position = at::arange(24, at::kLong).reshape({12, 2});
  return {expert, gate, keep, group, position};
}

TEST(Dispatcher, PermutationIsABijectionOverKeptChoices) {
  SelfCommunicator comm;
  Placement pl = Placement::contiguous(5, 1);
  Dispatcher d(comm, pl);
  Case c = make_case();
  DispatchPlan p = d.plan(c.expert, c.gate, c.keep, c.group, c.position, 24, 2);
  const int64_t kept = c.keep.sum().item<int64_t>();
  ASSERT_EQ(p.token.size(0), kept);
  // Every kept (token, expert) pair appears exactly once.
  std::multiset<std::pair<int64_t, int64_t>> want, got;
  for (int64_t t = 0; t < 12; ++t)
    for (int j = 0; j < 2; ++j)
      if (c.keep[t][j].item<bool>()) want.insert({t, c.expert[t][j].item<int64_t>()});
  for (int64_t i = 0; i < kept; ++i) got.insert({p.token[i].item<int64_t>(), p.send_expert[i].item<int64_t>()});
  EXPECT_EQ(want, got);
  // Expert-contiguous, counts add up, the unchosen expert has zero rows.
  EXPECT_TRUE(at::equal(p.send_expert, std::get<0>(p.send_expert.sort())));
  int64_t total = 0;
  for (int64_t n : p.expert_counts) total += n;
  EXPECT_EQ(total, kept);
  EXPECT_EQ(p.expert_counts[4], 0);
  EXPECT_EQ(p.expert_counts, p.send_counts);
}

TEST(Dispatcher, CombineOfDispatchWeighsByKeptGates) {
  SelfCommunicator comm;
  Placement pl = Placement::contiguous(5, 1);
  Dispatcher d(comm, pl);
  Case c = make_case();
  DispatchPlan p = d.plan(c.expert, c.gate, c.keep, c.group, c.position, 24, 2);
  at::Tensor x = at::randn({12, 3});
  at::Tensor y = d.combine(d.dispatch(x, p), p);  // identity experts
  at::Tensor weight = (c.gate * c.keep.to(at::kFloat)).sum(1, true);
  EXPECT_TRUE(at::allclose(y, x * weight, 1e-6, 1e-6));
}

TEST(Dispatcher, RowsOrderedByExpertThenGroupThenSlot) {
  SelfCommunicator comm;
  Placement pl = Placement::contiguous(5, 1);
  Dispatcher d(comm, pl);
  Case c = make_case();
  DispatchPlan p = d.plan(c.expert, c.gate, c.keep, c.group, c.position, 24, 2);
  at::Tensor key = p.send_expert * 1000 + c.group.select(1, 0).index_select(0, p.token) * 100;
  EXPECT_TRUE(at::equal(key, std::get<0>(key.sort())));
}

TEST(Dispatcher, AllChoicesDropped) {
  SelfCommunicator comm;
  Placement pl = Placement::contiguous(5, 1);
  Dispatcher d(comm, pl);
  Case c = make_case();
  c.keep.zero_();
  DispatchPlan p = d.plan(c.expert, c.gate, c.keep, c.group, c.position, 24, 2);
  EXPECT_EQ(p.token.size(0), 0);
  at::Tensor x = at::randn({12, 3}, at::requires_grad());
  at::Tensor y = d.combine(d.dispatch(x, p), p);
  EXPECT_TRUE(at::equal(y, at::zeros({12, 3})));  // residual only: zero MoE output
}

TEST(Placement, ContiguousAndErrors) {
  Placement p = Placement::contiguous(8, 3);
  EXPECT_EQ(p.local_experts(0), (std::vector<int>{0, 1}));
  EXPECT_EQ(p.local_experts(1), (std::vector<int>{2, 3, 4}));
  EXPECT_EQ(p.local_experts(2), (std::vector<int>{5, 6, 7}));
  EXPECT_THROW(Placement::contiguous(2, 4), std::exception);
  Placement s({1, 0, 1, 0}, 2);
  EXPECT_EQ(s.send_order(), (std::vector<int>{1, 3, 0, 2}));
  EXPECT_EQ(s.send_slot(0), 2);
  EXPECT_THROW(Placement({0, 2}, 2), std::exception);
}

}  // namespace
}  // namespace moeprune
