#include "model/dispatcher.h"

#include "dist/all_to_all.h"
#include "model/fused_dispatch.h"

#include <limits>

namespace moeprune {
namespace detail {

// The kept choices in the order of their sort key ((send slot, group), then
// position) without a sort, for host tensors: the kept choices of one (slot, group)
// hold positions 0 .. n-1 (capacity slots are handed out in turn), so each one's
// place is its bucket's start plus its position. A stable sort of 8192 keys took
// 0.8 ms on one core, most of a plan. In the same passes: the kept choices per
// expert, and each kept choice's token and expert (the tensor operations that did
// this cost ~0.1 ms per plan, more than the passes). `order` is undefined
// when the positions are not like that (then the caller sorts; same order either
// way, the kept keys being unique).
HostOrder kept_in_key_order(const at::Tensor& slot_of, const at::Tensor& expert, const at::Tensor& group,
                            const at::Tensor& position, const at::Tensor& keep, int64_t groups, int64_t K, int E) {
  HostOrder h;
  if (K < 1 || expert.dim() != 2 || expert.size(1) != K) return h;
  const int64_t N = expert.size(0), S = slot_of.numel(), G = std::max<int64_t>(groups, 1), buckets = S * G;
  if (buckets > std::max<int64_t>(16 * N * K, 1 << 16)) return h;
  // Read in place, strides and all (the selectors' outputs are choice-major views;
  // a copy costs as much as a pass here): only another dtype is converted.
  const auto as = [&](const at::Tensor& t, at::ScalarType dt) {
    const at::Tensor v = t.reshape({N, K});
    return v.scalar_type() == dt ? v : v.to(dt);
  };
  const at::Tensor e = as(expert, at::kLong), g = as(group, at::kLong), ps = as(position, at::kLong),
                   kp = as(keep, at::kBool);
  const auto reader = [](const at::Tensor& t, auto* p) {
    return [p, s0 = t.stride(0), s1 = t.stride(1)](int64_t i, int64_t j) { return p[i * s0 + j * s1]; };
  };
  const auto ep = reader(e, e.data_ptr<int64_t>()), gp = reader(g, g.data_ptr<int64_t>()),
             pp = reader(ps, ps.data_ptr<int64_t>());
  const auto kk = reader(kp, kp.data_ptr<bool>());
  const int64_t* so = slot_of.data_ptr<int64_t>();
  std::vector<int64_t> start(static_cast<size_t>(buckets) + 1, 0), counts(static_cast<size_t>(E), 0);
  int64_t kept = 0;
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < K; ++j) {
      if (!kk(i, j)) continue;
      const int64_t ex = ep(i, j), gr = gp(i, j);
      if (ex < 0 || ex >= E || ex >= S || gr < 0 || gr >= G) return h;
      ++start[static_cast<size_t>(so[ex] * G + gr + 1)];
      ++counts[static_cast<size_t>(ex)];
      ++kept;
    }
  for (int64_t b = 0; b < buckets; ++b) start[static_cast<size_t>(b + 1)] += start[static_cast<size_t>(b)];
  at::Tensor out = at::empty({3, kept}, at::kLong);  // order, token, expert
  int64_t *o = out.data_ptr<int64_t>(), *t = o + kept, *x = t + kept;
  std::vector<uint64_t> taken(static_cast<size_t>(kept + 63) / 64, 0);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < K; ++j) {
      if (!kk(i, j)) continue;
      const int64_t ex = ep(i, j), pos = pp(i, j);
      const auto b = static_cast<size_t>(so[ex] * G + gp(i, j));
      const int64_t at = start[b] + pos;
      if (pos < 0 || at >= start[b + 1]) return h;  // gaps: sort instead
      uint64_t& word = taken[static_cast<size_t>(at) / 64];
      const uint64_t bit = uint64_t{1} << (at % 64);
      if (word & bit) return h;  // two choices in one place: positions repeat
      word |= bit;
      o[at] = i * K + j, t[at] = i, x[at] = ex;
    }
  h.order = out[0];
  h.token = out[1];
  h.expert = out[2];
  h.counts = std::move(counts);
  return h;
}

}  // namespace detail

void TokenDispatcher::fill_plan(const RoutedChoices& c, DispatchPlan& p) const {
  const Placement& pl = *placement_;
  const int W = comm_->size();
  const int me = comm_->rank();
  const int E = pl.num_experts();
  const at::Tensor& expert = c.expert;
  const int64_t K = expert.size(1);
  p.num_tokens = expert.size(0);
  p.top_k = K;

  // Every choice is sorted, the dropped ones keyed past all kept ones, so that the
  // number of kept choices is learnt with the counts in one device-to-host copy
  // (a nonzero() would be a second stall of a GPU's stream). Kept keys are unique
  // (one (slot, group, position) per kept choice), so the order is the same as
  // sorting the kept choices alone.
  if (!slot_of_.defined() || slot_of_.device() != expert.device()) {
    std::vector<int64_t> slot_table(pl.send_order().size());
    for (int ex = 0; ex < E; ++ex) slot_table[ex] = pl.send_slot(ex);
    slot_of_ = at::tensor(slot_table, at::kLong).to(expert.device());
  }
  detail::HostOrder h;
  if (expert.is_cpu()) h = detail::kept_in_key_order(slot_of_, expert, c.group, c.position, c.keep, c.num_groups, K, E);
  if (h.order.defined()) {
    p.send_counts = std::move(h.counts);
    p.choice = h.order;
    p.token = h.token;
    p.send_expert = h.expert;
  } else {
    const at::Tensor keep = c.keep.reshape({-1}), e_all = expert.reshape({-1});
    at::Tensor key = (slot_of_.index_select(0, e_all) * c.num_groups + c.group.reshape({-1})) * c.capacity +
                     c.position.reshape({-1});
    key = key.masked_fill(keep.logical_not(), std::numeric_limits<int64_t>::max());
    at::Tensor order = std::get<1>(key.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));

    // Counts per expert (by expert id) on the host: they size the exchange. Bin E
    // collects the dropped choices. (index_add, not bincount: CUDA's bincount reads
    // the input's maximum back to the host first.)
    at::Tensor bin = at::where(keep, e_all, E);
    at::Tensor counts_t =
        at::zeros({E + 1}, e_all.options()).index_add_(0, bin, at::ones_like(bin)).to(at::kCPU);
    const int64_t* cnt = counts_t.data_ptr<int64_t>();
    p.send_counts.assign(cnt, cnt + E);
    int64_t kept_total = 0;
    for (int ex = 0; ex < E; ++ex) kept_total += cnt[ex];
    order = order.narrow(0, 0, kept_total);
    p.choice = order;
    p.token = at::floor_divide(p.choice, K);
    p.send_expert = e_all.index_select(0, order);
  }
  p.gate = c.gate.reshape({-1}).index_select(0, p.choice);

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
}

at::Tensor TokenDispatcher::send(const at::Tensor& payload, const DispatchPlan& p) const {
  return all_to_all_blocks_autograd(payload, p.send_blocks, p.recv_rows, p.recv_blocks, *comm_);
}

at::Tensor TokenDispatcher::send_back(const at::Tensor& y, const DispatchPlan& p) const {
  // The reverse exchange returns the rows in send order.
  return all_to_all_blocks_autograd(y, p.recv_blocks, p.token.size(0), p.send_blocks, *comm_);
}

// ---------------------------------------------------------------------------
Selection TorchDispatcher::select(const at::Tensor& probs, int k, int64_t capacity, bool bpr,
                                  const at::Tensor& token_valid) const {
  return TorchSelector().select(probs, k, capacity, bpr, token_valid);
}

std::unique_ptr<DispatchPlan> TorchDispatcher::plan(const RoutedChoices& c) const {
  auto p = std::make_unique<DispatchPlan>();
  fill_plan(c, *p);
  return p;
}

at::Tensor TorchDispatcher::dispatch(const at::Tensor& x, const DispatchPlan& p) const {
  return send(x.index_select(0, p.token), p);  // permute into send order, then one exchange
}

at::Tensor TorchDispatcher::combine(const at::Tensor& y, const DispatchPlan& p) const {
  at::Tensor returned = send_back(y, p);
  at::Tensor weighted = returned * p.gate.unsqueeze(1).to(returned.dtype());
  return at::zeros({p.num_tokens, y.size(1)}, y.options()).index_add(0, p.token, weighted);
}

// ---------------------------------------------------------------------------
std::unique_ptr<TokenDispatcher> make_dispatcher(DispatcherKind kind, c10::Device device, Communicator& comm,
                                                 const Placement& placement) {
  bool kernels = false;
  switch (kind) {
    case DispatcherKind::Torch: break;
    case DispatcherKind::Kernels: kernels = device.is_cpu() || cuda_kernels_runnable(device.index()); break;
    // Auto: the kernels wherever they run; on CPUs their path moves rows by the
    // direct exchange, 2x faster than the torch ops (docs/performance.md).
    case DispatcherKind::Auto: kernels = device.is_cpu() || cuda_kernels_runnable(device.index()); break;
  }
  if (kernels) return std::make_unique<KernelDispatcher>(comm, placement);
  return std::make_unique<TorchDispatcher>(comm, placement);
}

}  // namespace moeprune
