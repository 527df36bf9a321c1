#include "model/dispatcher.h"

#include "dist/all_to_all.h"
#include "model/fused_dispatch.h"

namespace moeprune {

DispatchPlan Dispatcher::plan(const at::Tensor& expert, const at::Tensor& gate, const at::Tensor& keep,
                              const at::Tensor& group, const at::Tensor& position, int64_t capacity,
                              int64_t num_groups) const {
  const Placement& pl = *placement_;
  const int W = comm_->size();
  const int me = comm_->rank();
  const int E = pl.num_experts();
  const int64_t K = expert.size(1);
  DispatchPlan p;
  p.num_tokens = expert.size(0);

  at::Tensor kept = keep.reshape({-1}).nonzero().squeeze(1);  // flat choice indices
  at::Tensor e = expert.reshape({-1}).index_select(0, kept);
  std::vector<int64_t> slot_table(pl.send_order().size());
  for (int ex = 0; ex < E; ++ex) slot_table[ex] = pl.send_slot(ex);
  at::Tensor slot_of = at::tensor(slot_table, at::kLong).to(expert.device());
  at::Tensor slot = slot_of.index_select(0, e);
  at::Tensor key = (slot * num_groups + group.reshape({-1}).index_select(0, kept)) * capacity +
                   position.reshape({-1}).index_select(0, kept);
  at::Tensor order = std::get<1>(key.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  at::Tensor choice = kept.index_select(0, order);
  p.choice = choice;
  p.top_k = K;
  p.token = at::floor_divide(choice, K);
  p.gate = gate.reshape({-1}).index_select(0, choice);
  p.send_expert = e.index_select(0, order);

  // Counts per expert (by expert id) on the host: they size the exchange.
  at::Tensor counts_t = at::bincount(p.send_expert.to(at::kCPU), {}, E);
  const int64_t* c = counts_t.data_ptr<int64_t>();
  p.send_counts.assign(c, c + E);

  // Tell every rank how many rows each of its experts gets from here.
  int block = 0;
  for (int r = 0; r < W; ++r) block = std::max<int>(block, static_cast<int>(pl.local_experts(r).size()));
  std::vector<int64_t> send_blocks(static_cast<size_t>(W) * block, 0);
  p.send_splits.assign(W, 0);
  for (int r = 0; r < W; ++r) {
    const auto& local = pl.local_experts(r);
    for (size_t i = 0; i < local.size(); ++i) {
      send_blocks[static_cast<size_t>(r) * block + i] = p.send_counts[local[i]];
      p.send_splits[r] += p.send_counts[local[i]];
    }
  }
  const std::vector<int64_t> recv_blocks = comm_->exchange_counts(send_blocks, block);

  // Received rows arrive as (source rank, local expert); regroup as (local expert, source).
  const auto& mine = pl.local_experts(me);
  const int L = static_cast<int>(mine.size());
  p.recv_splits.assign(W, 0);
  p.expert_counts.assign(L, 0);
  std::vector<std::vector<int64_t>> offset(W, std::vector<int64_t>(L));
  int64_t total = 0;
  for (int s = 0; s < W; ++s)
    for (int i = 0; i < L; ++i) {
      const int64_t n = recv_blocks[static_cast<size_t>(s) * block + i];
      offset[s][i] = total;
      total += n;
      p.recv_splits[s] += n;
      p.expert_counts[i] += n;
    }
  std::vector<int64_t> perm;
  perm.reserve(total);
  for (int i = 0; i < L; ++i)
    for (int s = 0; s < W; ++s) {
      const int64_t n = recv_blocks[static_cast<size_t>(s) * block + i];
      for (int64_t j = 0; j < n; ++j) perm.push_back(offset[s][i] + j);
    }
  p.recv_to_expert_major = at::tensor(perm, at::kLong).to(expert.device());
  p.fused = use_kernels(expert);
  if (p.fused) {
    p.send_row_of = inverse_rows(p.choice, p.num_tokens, K);
    p.expert_major_row = inverse_rows(p.recv_to_expert_major, total, 1).view({-1});
  }
  return p;
}

at::Tensor Dispatcher::dispatch(const at::Tensor& x, const DispatchPlan& p) const {
  if (p.fused) {
    at::Tensor payload = permute_rows_autograd(x, p.token, p.send_row_of);
    at::Tensor received = all_to_all_autograd(payload, p.send_splits, p.recv_splits, *comm_);
    return permute_rows_autograd(received, p.recv_to_expert_major, p.expert_major_row.view({-1, 1}));
  }
  at::Tensor payload = x.index_select(0, p.token);
  at::Tensor received = all_to_all_autograd(payload, p.send_splits, p.recv_splits, *comm_);
  return received.index_select(0, p.recv_to_expert_major);
}

at::Tensor Dispatcher::combine(const at::Tensor& y, const DispatchPlan& p) const {
  if (p.fused) {
    at::Tensor back = permute_rows_autograd(y, p.expert_major_row, p.recv_to_expert_major.view({-1, 1}));
    at::Tensor returned = all_to_all_autograd(back, p.recv_splits, p.send_splits, *comm_);
    return combine_autograd(returned, p.gate, p.token, p.send_row_of);
  }
  // Undo the regrouping: row perm[i] of the received layout is row i of y.
  at::Tensor back = at::zeros_like(y).index_copy(0, p.recv_to_expert_major, y);
  at::Tensor returned = all_to_all_autograd(back, p.recv_splits, p.send_splits, *comm_);
  at::Tensor weighted = returned * p.gate.unsqueeze(1).to(returned.dtype());
  return at::zeros({p.num_tokens, y.size(1)}, y.options()).index_add(0, p.token, weighted);
}

}  // namespace moeprune
