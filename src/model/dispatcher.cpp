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
  p.token = at::floor_divide(choice, K);
  p.gate = gate.reshape({-1}).index_select(0, choice);
  p.send_expert = e.index_select(0, order);

  // Counts per expert (by expert id) on the host: they size the exchange.
  at::Tensor counts_t = at::bincount(p.send_expert.to(at::kCPU), {}, E);
  const int64_t* c = counts_t.data_ptr<int64_t>();
  p.send_counts.assign(c, c + E);

  // Tell every rank how many rows each of its experts gets from here. Send order
  // is (rank, its local experts in order), so each (rank, expert) is one block.
  int block = 0;
  for (int r = 0; r < W; ++r) block = std::max<int>(block, static_cast<int>(pl.local_experts(r).size()));
  std::vector<int64_t> send_counts_blocked(static_cast<size_t>(W) * block, 0);
  p.send_splits.assign(W, 0);
  int64_t send_off = 0;
  for (int r = 0; r < W; ++r) {
    const auto& local = pl.local_experts(r);
    for (size_t i = 0; i < local.size(); ++i) {
      const int64_t n = p.send_counts[local[i]];
      send_counts_blocked[static_cast<size_t>(r) * block + i] = n;
      p.send_splits[r] += n;
      p.send_blocks.push_back(RowBlock{r, send_off, n});
      send_off += n;
    }
  }
  const std::vector<int64_t> recv_counts = comm_->exchange_counts(send_counts_blocked, block);

  // Received rows land expert-major, (local expert, source rank): the receive block
  // of (source s, expert i) starts after the rows of experts < i and of the sources
  // < s for expert i. Blocks are listed per source in expert order, the order in
  // which that source sends them.
  const auto& mine = pl.local_experts(me);
  const int L = static_cast<int>(mine.size());
  p.recv_splits.assign(W, 0);
  p.expert_counts.assign(L, 0);
  for (int s = 0; s < W; ++s)
    for (int i = 0; i < L; ++i) {
      const int64_t n = recv_counts[static_cast<size_t>(s) * block + i];
      p.recv_splits[s] += n;
      p.expert_counts[i] += n;
    }
  std::vector<int64_t> next(L, 0);  // next free row of each local expert
  for (int i = 1; i < L; ++i) next[i] = next[i - 1] + p.expert_counts[i - 1];
  for (int s = 0; s < W; ++s)
    for (int i = 0; i < L; ++i) {
      const int64_t n = recv_counts[static_cast<size_t>(s) * block + i];
      p.recv_blocks.push_back(RowBlock{s, next[i], n});
      next[i] += n;
    }
  p.recv_rows = L ? next[L - 1] : 0;
  p.fused = use_kernels(expert);
  if (p.fused) p.send_row_of = inverse_rows(choice, p.num_tokens, K);
  return p;
}

at::Tensor Dispatcher::dispatch(const at::Tensor& x, const DispatchPlan& p) const {
  // Permute into send order, then one exchange that writes expert-major directly.
  at::Tensor payload = p.fused ? permute_rows_autograd(x, p.token, p.send_row_of) : x.index_select(0, p.token);
  return all_to_all_blocks_autograd(payload, p.send_blocks, p.recv_rows, p.recv_blocks, *comm_);
}

at::Tensor Dispatcher::combine(const at::Tensor& y, const DispatchPlan& p) const {
  // The reverse exchange returns the rows in send order; then the gate-weighted sum per token.
  const int64_t sent = p.token.size(0);
  at::Tensor returned = all_to_all_blocks_autograd(y, p.recv_blocks, sent, p.send_blocks, *comm_);
  if (p.fused) return combine_autograd(returned, p.gate, p.token, p.send_row_of);
  at::Tensor weighted = returned * p.gate.unsqueeze(1).to(returned.dtype());
  return at::zeros({p.num_tokens, y.size(1)}, y.options()).index_add(0, p.token, weighted);
}

}  // namespace moeprune
