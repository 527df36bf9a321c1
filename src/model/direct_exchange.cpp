#include "model/direct_exchange.h"

#include <ATen/Dispatch.h>
#include <ATen/core/ivalue.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <cstdint>
#include <tuple>
#include <vector>

#include "core/error.h"
#include "dist/node_memory.h"

namespace moeprune {
namespace {

// Where a plan's rows go, split into the rank's own rows and the others'.
struct Route {
  int64_t tokens = 0, top_k = 0, send_rows = 0, recv_rows = 0;
  std::vector<RowBlock> send_peer, recv_peer;  // blocks to and from other ranks
  // The rank's own blocks, paired: send rows [so, so + n) are received at [ro, ro + n).
  struct Pair {
    int64_t so, ro, n;
  };
  std::vector<Pair> own;

  static Route of(const DispatchPlan& p, int me) {
    Route r;
    r.tokens = p.num_tokens;
    r.top_k = p.top_k;
    r.send_rows = p.token.size(0);
    r.recv_rows = p.recv_rows;
    std::vector<const RowBlock*> out, in;
    for (const RowBlock& b : p.send_blocks) {
      if (b.peer != me) r.send_peer.push_back(b);
      else if (b.rows) out.push_back(&b);
    }
    for (const RowBlock& b : p.recv_blocks) {
      if (b.peer != me) r.recv_peer.push_back(b);
      else if (b.rows) in.push_back(&b);
    }
    TORCH_CHECK(out.size() == in.size(), "direct exchange: rank ", me, " sends itself ", out.size(),
                " blocks but receives ", in.size());
    for (size_t i = 0; i < out.size(); ++i) {
      TORCH_CHECK(out[i]->rows == in[i]->rows, "direct exchange: own block ", i, " sends ", out[i]->rows,
                  " rows but receives ", in[i]->rows);
      r.own.push_back({out[i]->offset, in[i]->offset, out[i]->rows});
    }
    return r;
  }

  // Autograd keeps IValues only: the route as one integer vector.
  std::vector<int64_t> flat() const {
    std::vector<int64_t> v{tokens, top_k, send_rows, recv_rows, static_cast<int64_t>(send_peer.size()),
                           static_cast<int64_t>(recv_peer.size()), static_cast<int64_t>(own.size())};
    for (const auto* blocks : {&send_peer, &recv_peer})
      for (const RowBlock& b : *blocks) v.insert(v.end(), {b.peer, b.offset, b.rows});
    for (const Pair& q : own) v.insert(v.end(), {q.so, q.ro, q.n});
    return v;
  }
  static Route unflat(const std::vector<int64_t>& v) {
    Route r;
    r.tokens = v[0], r.top_k = v[1], r.send_rows = v[2], r.recv_rows = v[3];
    size_t i = 7;
    for (auto [blocks, n] : {std::pair{&r.send_peer, v[4]}, std::pair{&r.recv_peer, v[5]}})
      for (int64_t j = 0; j < n; ++j, i += 3) blocks->push_back({static_cast<int>(v[i]), v[i + 1], v[i + 2]});
    for (int64_t j = 0; j < v[6]; ++j, i += 3) r.own.push_back({v[i], v[i + 1], v[i + 2]});
    return r;
  }

  // Where the returned row of each choice n * top_k + j is, as a row of the
  // concatenation [own; back]: own rows (the rank's own experts' rows, recv_rows of
  // them) at their place among those, the other ranks' rows at recv_rows + their
  // send row in `back`; -1 for dropped choices. With the gate of each choice
  // (0 when dropped) when `gate` is given.
  std::pair<at::Tensor, at::Tensor> sources(const at::Tensor& choice, const at::Tensor& gate) const {
    at::Tensor where = at::full({tokens * top_k}, -1, at::kLong);
    at::Tensor weight = gate.defined() ? at::zeros({tokens * top_k}, at::kFloat) : at::Tensor();
    int64_t* w = where.data_ptr<int64_t>();
    const int64_t* c = choice.data_ptr<int64_t>();
    for (int64_t a = 0; a < send_rows; ++a) w[c[a]] = recv_rows + a;
    for (const Pair& q : own)
      for (int64_t i = 0; i < q.n; ++i) w[c[q.so + i]] = q.ro + i;
    if (gate.defined()) {
      float* g = weight.data_ptr<float>();
      const float* ga = gate.data_ptr<float>();
      for (int64_t a = 0; a < send_rows; ++a) g[c[a]] = ga[a];
    }
    return {where, weight};
  }
};

void save(torch::autograd::AutogradContext* ctx, const Route& r, const at::Tensor& token, Communicator& comm) {
  ctx->saved_data["route"] = r.flat();
  ctx->saved_data["token"] = token;
  ctx->saved_data["comm"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(&comm));
}
Communicator& comm_of(torch::autograd::AutogradContext* ctx) {
  return *reinterpret_cast<Communicator*>(static_cast<intptr_t>(ctx->saved_data["comm"].toInt()));
}

// Asks for the start of a row that is read soon (rows are gathered in random
// order: the hardware prefetchers only pick a row up after its first lines).
inline void prefetch_row(const void* row, int64_t bytes) {
  const auto* p = static_cast<const char*>(row);
  for (int64_t b = 0; b < std::min<int64_t>(bytes, 512); b += 64) __builtin_prefetch(p + b, 0, 3);
}

// dst_row = row idx[a] of x (row size rb), asking for row idx[a + 2] of x meanwhile
// where a + 2 < end and it is a row of x (`rows` of them).
inline void copy_row_ahead(char* dst_row, const char* xs, const int64_t* idx, int64_t a, int64_t end, int64_t rows,
                           int64_t rb) {
  if (a + 2 < end && idx[a + 2] >= 0 && idx[a + 2] < rows) prefetch_row(xs + idx[a + 2] * rb, rb);
  std::memcpy(dst_row, xs + idx[a] * rb, static_cast<size_t>(rb));
}

// Elements per task of the row-parallel loops: enough to amortise a task.
constexpr int64_t kGrainElements = 1024;

// out[n] = sum_j weight[n, j] * row(where[n, j]) over the K choices of token n
// whose `where` is >= 0, row(i) = rows[i] (a row of `like`'s type and width,
// anywhere in memory). Without weight: plain sums. Each output row is written once
// (no zero fill, no read-modify-write), rows of a token summed in choice order.
// With `stash`, every row i >= stash_from whose row(i) is not already
// stash[i - stash_from] is also copied there as it is read.
at::Tensor gather_sum_rows(const at::Tensor& where, const at::Tensor& weight, int64_t K, const at::Tensor& like,
                           const std::vector<const void*>& rows, at::Tensor stash = {}, int64_t stash_from = 0) {
  const int64_t N = where.size(0) / std::max<int64_t>(K, 1), H = like.size(1);
  at::Tensor out = at::empty({N, H}, like.options());
  if (N == 0 || H == 0) return out;
  const int64_t* wh = where.data_ptr<int64_t>();
  const float* g = weight.defined() ? weight.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, like.scalar_type(), "gather_sum", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* st = stash.defined() ? stash.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, std::max<int64_t>(1, kGrainElements / H), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        if (n + 2 < n1)
          for (int64_t j = 0; j < K; ++j)
            if (const int64_t i = wh[(n + 2) * K + j]; i >= 0)
              prefetch_row(rows[static_cast<size_t>(i)], H * static_cast<int64_t>(sizeof(scalar_t)));
        scalar_t* dst = o + n * H;
        bool first = true;
        for (int64_t j = 0; j < K; ++j) {
          const int64_t i = wh[n * K + j];
          if (i < 0) continue;
          const auto* src = static_cast<const scalar_t*>(rows[static_cast<size_t>(i)]);
          if (st && i >= stash_from && src != st + (i - stash_from) * H)
            std::memcpy(st + (i - stash_from) * H, src, static_cast<size_t>(H) * sizeof(scalar_t));
          const float w = g ? g[n * K + j] : 1.0f;
          if (first) {  // 0 + w * row, rounded as the torch ops' mul then index_add
            for (int64_t c = 0; c < H; ++c) dst[c] = static_cast<scalar_t>(w * static_cast<float>(src[c]));
          } else {
            for (int64_t c = 0; c < H; ++c) {
              const scalar_t prod = static_cast<scalar_t>(w * static_cast<float>(src[c]));
              dst[c] = static_cast<scalar_t>(static_cast<float>(dst[c]) + static_cast<float>(prod));
            }
          }
          first = false;
        }
        if (first)
          for (int64_t c = 0; c < H; ++c) dst[c] = scalar_t(0);
      }
    });
  });
  return out;
}

// gather_sum_rows with row(i) = own[i] for i < own rows, else back[i - own rows].
at::Tensor gather_sum(const at::Tensor& where, const at::Tensor& weight, int64_t K, const at::Tensor& own,
                      const at::Tensor& back) {
  const int64_t R = own.size(0), B = back.defined() ? back.size(0) : 0, rb = row_bytes(own);
  std::vector<const void*> rows(static_cast<size_t>(R + B));
  const auto* y = static_cast<const char*>(own.data_ptr());
  for (int64_t i = 0; i < R; ++i) rows[static_cast<size_t>(i)] = y + i * rb;
  if (B) {
    const auto* b = static_cast<const char*>(back.data_ptr());
    for (int64_t i = 0; i < B; ++i) rows[static_cast<size_t>(R + i)] = b + i * rb;
  }
  return gather_sum_rows(where, weight, K, own, rows);
}

// Runs of rows: row `to + i` goes with index `from + i` for i < n. The helpers
// below make one parallel pass over all rows of their runs (a tensor operation per
// run cost ~10 us: 16 runs per rank and step at E = 32 on 2 ranks).
struct Run {
  int64_t to, from, n;
};
std::vector<Run> runs_of(const std::vector<Route::Pair>& own) {  // received row ro + i, send row so + i
  std::vector<Run> v;
  for (const Route::Pair& q : own) v.push_back({q.ro, q.so, q.n});
  return v;
}
std::vector<Run> runs_of(const std::vector<RowBlock>& blocks) {  // send rows, in place
  std::vector<Run> v;
  for (const RowBlock& b : blocks) v.push_back({b.offset, b.offset, b.rows});
  return v;
}

int64_t rows_in(const std::vector<Run>& runs) {
  int64_t n = 0;
  for (const Run& q : runs) n += q.n;
  return n;
}

// fn(to, from) for every row of `runs`, rows split among threads (grain: rows of H elements).
template <class F>
void for_each_row(const std::vector<Run>& runs, int64_t H, const F& fn) {
  std::vector<int64_t> first(runs.size() + 1, 0);  // run q's rows are [first[q], first[q + 1]) of the pass
  for (size_t q = 0; q < runs.size(); ++q) first[q + 1] = first[q] + runs[q].n;
  if (first.back() == 0) return;
  at::parallel_for(0, first.back(), std::max<int64_t>(1, kGrainElements / std::max<int64_t>(H, 1)),
                   [&](int64_t a0, int64_t a1) {
                     auto q = static_cast<size_t>(std::upper_bound(first.begin(), first.end(), a0) - first.begin() - 1);
                     for (int64_t a = a0; a < a1; ++a) {
                       while (a >= first[q + 1]) ++q;
                       const int64_t i = a - first[q];
                       fn(runs[q].to + i, runs[q].from + i);
                     }
                   });
}

// out[to] = gate[from] * src[index[from]] over the runs.
void gather_scaled(at::Tensor& out, const at::Tensor& src, const at::Tensor& index, const at::Tensor& gate,
                   const std::vector<Run>& runs) {
  const int64_t H = src.size(1);
  if (H == 0 || rows_in(runs) == 0) return;
  const int64_t* idx = index.data_ptr<int64_t>();
  const float* g = gate.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "gather_scaled", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* s = src.data_ptr<scalar_t>();
    for_each_row(runs, H, [&](int64_t to, int64_t from) {
      const scalar_t* row = s + idx[from] * H;
      const float w = g[from];
      scalar_t* d = o + to * H;
      for (int64_t c = 0; c < H; ++c) d[c] = static_cast<scalar_t>(w * static_cast<float>(row[c]));
    });
  });
}

// idx[first .. first + n) are rows of x (x has `rows`): checked before any row is
// read by them, or written into another rank's memory.
void check_rows_of_x(const int64_t* idx, int64_t first, int64_t n, int64_t rows) {
  for (int64_t i = first; i < first + n; ++i)
    TORCH_CHECK(idx[i] >= 0 && idx[i] < rows, "direct dispatch: row index ", idx[i], " outside the ", rows, " rows of x");
}

// The rank's own rows into the received rows: dst[ro + i] = src[token[so + i]] for
// each own pair, bounds checked (rows of x are read by index).
void gather_own(at::Tensor& dst, const at::Tensor& src, const at::Tensor& token, const std::vector<Route::Pair>& own) {
  const int64_t rb = row_bytes(src), H = src.size(1), rows = src.size(0);
  const std::vector<Run> runs = runs_of(own);
  if (rows_in(runs) == 0) return;
  TORCH_CHECK(dst.is_contiguous() && src.is_contiguous() && row_bytes(dst) == rb,
              "direct dispatch: own rows need contiguous buffers of one row size");
  const int64_t* idx = token.data_ptr<int64_t>();
  for (const Run& q : runs) check_rows_of_x(idx, q.from, q.n, rows);
  auto* d = static_cast<char*>(dst.data_ptr());
  const auto* s = static_cast<const char*>(src.data_ptr());
  const int64_t n_idx = token.numel();
  for_each_row(runs, H, [&](int64_t to, int64_t from) { copy_row_ahead(d + to * rb, s, idx, from, n_idx, rows, rb); });
}

// dst[from] = <src[index[from]], rows[to]> over the runs, accumulated in float.
void row_dots(at::Tensor& dst, const at::Tensor& src, const at::Tensor& index, const at::Tensor& rows,
              const std::vector<Run>& runs) {
  const int64_t H = src.size(1);
  if (rows_in(runs) == 0) return;
  const int64_t* idx = index.data_ptr<int64_t>();
  float* d = dst.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "row_dots", [&] {
    const scalar_t* s = src.data_ptr<scalar_t>();
    const scalar_t* y = rows.data_ptr<scalar_t>();
    for_each_row(runs, H, [&](int64_t to, int64_t from) {
      const scalar_t* a = s + idx[from] * H;
      const scalar_t* b = y + to * H;
      float acc[4] = {0, 0, 0, 0};  // four partial sums: the loop vectorises
      int64_t c = 0;
      for (; c + 4 <= H; c += 4)
        for (int u = 0; u < 4; ++u) acc[u] += static_cast<float>(a[c + u]) * static_cast<float>(b[c + u]);
      for (; c < H; ++c) acc[0] += static_cast<float>(a[c]) * static_cast<float>(b[c]);
      d[from] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    });
  });
}

// The combine's backward, d y[a] = gate[a] * g[token[a]]: the other ranks' rows,
// in send order (to be sent back to the experts).
at::Tensor scaled_peer_rows(const Route& r, const at::Tensor& g, const at::Tensor& token, const at::Tensor& gate) {
  at::Tensor scaled = at::empty({r.send_rows, g.size(1)}, g.options());
  gather_scaled(scaled, g, token, gate, runs_of(r.send_peer));
  return scaled;
}

// The rest of the combine's backward, local: the own rows' d y into grad_y, and
// d gate[a] = <g[token[a]], y[a]> with the other ranks' outputs y[a] in `back`.
void own_and_gate_grads(const Route& r, const at::Tensor& g, const at::Tensor& token, const at::Tensor& gate,
                        const at::Tensor& y, const at::Tensor& back, at::Tensor& grad_y, at::Tensor& grad_gate) {
  const std::vector<Run> own = runs_of(r.own);
  gather_scaled(grad_y, g, token, gate, own);
  row_dots(grad_gate, g, token, y, own);
  row_dots(grad_gate, g, token, back, runs_of(r.send_peer));
}

// ---------------------------------------------------------------------------
// The exchange through node memory (dist/node_memory.h: every rank of the
// communicator on this node maps every other rank's segment). Dispatch: each rank
// writes the rows it sends straight into the receiver's buffer. Combine: each rank
// reads the other ranks' expert outputs where their experts wrote them while it
// sums. One pass over the rows each, against a copy followed by a pass through MPI.
// Rows whose buffer is not in node memory (no room left, or experts that wrote
// elsewhere) go through MPI as before; both sides of a pair know which from the
// offsets they swap first.
constexpr int kRowTag = 0x3fff, kOffsetTag = 0x3ffe, kSignalTag = 0x3ffd;

// Small int64 messages: to[p] goes to rank p, from[p] values come from rank p (both
// sides know the counts), with `meanwhile` run while they travel.
std::vector<std::vector<int64_t>> swap_values(Communicator& comm, const std::vector<std::vector<int64_t>>& to,
                                              const std::vector<int64_t>& from, int tag,
                                              const std::function<void()>& meanwhile = {}) {
  const int W = comm.size();
  std::vector<RowBlock> sb, rbk;
  int64_t n_out = 0, n_in = 0;
  for (int p = 0; p < W; ++p) {
    const auto n = static_cast<int64_t>(to[static_cast<size_t>(p)].size());
    if (n) sb.push_back({p, n_out, n}), n_out += n;
    if (const int64_t f = from[static_cast<size_t>(p)]) rbk.push_back({p, n_in, f}), n_in += f;
  }
  at::Tensor out = at::empty({n_out, 1}, at::kLong), in = at::empty({n_in, 1}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (const auto& v : to) o = std::copy(v.begin(), v.end(), o);
  std::atomic_thread_fence(std::memory_order_seq_cst);  // what was written before goes out before the message
  std::unique_ptr<PendingBlocks> pending = comm.post_blocks(out, {}, sb, std::vector<int>(sb.size(), tag), in, rbk,
                                                            std::vector<int>(rbk.size(), tag));
  pending->wait_after(meanwhile);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  std::vector<std::vector<int64_t>> got(static_cast<size_t>(W));
  const int64_t* g = in.data_ptr<int64_t>();
  for (const RowBlock& b : rbk) got[static_cast<size_t>(b.peer)].assign(g + b.offset, g + b.offset + b.rows);
  return got;
}

std::vector<int64_t> blocks_per_peer(const std::vector<RowBlock>& blocks, int W) {
  std::vector<int64_t> n(static_cast<size_t>(W), 0);
  for (const RowBlock& b : blocks) ++n[static_cast<size_t>(b.peer)];
  return n;
}

// Where each of `blocks` lies in node memory for its peer (a byte offset in this
// rank's segment), -1 for all when `buf` is not in node memory; per peer, in order.
std::vector<std::vector<int64_t>> offsets_for_peers(const NodeMemory& m, const at::Tensor& buf,
                                                    const std::vector<RowBlock>& blocks, int W) {
  const int64_t rb = row_bytes(buf);
  const int64_t base = buf.numel() ? m.offset_of(buf.data_ptr(), static_cast<size_t>(buf.size(0) * rb)) : -1;
  std::vector<std::vector<int64_t>> to(static_cast<size_t>(W));
  for (const RowBlock& b : blocks) to[static_cast<size_t>(b.peer)].push_back(base < 0 ? -1 : base + b.offset * rb);
  return to;
}

// This rank's blocks (send order) split by where their peer said they lie (offsets
// per peer, in block order; see offsets_for_peers): those with no place in node
// memory (MPI) and those with one (block, offset), with a one-value signal for each
// peer that has blocks of the second kind.
struct NodeSplit {
  std::vector<RowBlock> mpi;
  std::vector<std::pair<RowBlock, int64_t>> shared;
  std::vector<std::vector<int64_t>> signal;
};
NodeSplit split_by_offsets(const std::vector<RowBlock>& blocks, const std::vector<std::vector<int64_t>>& at_peer,
                           int W) {
  NodeSplit split;
  split.signal.resize(static_cast<size_t>(W));
  std::vector<size_t> next(static_cast<size_t>(W), 0);
  for (const RowBlock& b : blocks) {
    const auto p = static_cast<size_t>(b.peer);
    const int64_t off = at_peer[p][next[p]++];
    if (off < 0) {
      split.mpi.push_back(b);
    } else {
      split.shared.emplace_back(b, off);
      split.signal[p] = {1};
    }
  }
  return split;
}

at::Tensor node_dispatch(const at::Tensor& x, const Route& r, const at::Tensor& token, Communicator& comm,
                         const std::shared_ptr<NodeMemory>& m) {
  const int W = comm.size();
  const int64_t H = x.size(1), rb = row_bytes(x), src_rows = x.size(0);
  at::Tensor recv = node_empty(m, {r.recv_rows, H}, x.options());
  if (!recv.defined()) recv = at::empty({r.recv_rows, H}, x.options());  // no room: the senders use MPI
  const int64_t* idx = token.data_ptr<int64_t>();
  for (const RowBlock& b : r.send_peer) check_rows_of_x(idx, b.offset, b.rows, src_rows);
  // 1. Every rank tells each sender where its blocks go.
  const std::vector<std::vector<int64_t>> to = offsets_for_peers(*m, recv, r.recv_peer, W);
  const bool here = !to.empty() && std::any_of(to.begin(), to.end(), [](const auto& v) { return !v.empty() && v[0] >= 0; });
  const auto at_peer = swap_values(comm, to, blocks_per_peer(r.send_peer, W), kOffsetTag);
  // 2. Blocks to ranks without node memory for them go through MPI, the others are
  // written into the receiver's buffer here.
  const NodeSplit send = split_by_offsets(r.send_peer, at_peer, W);
  const std::vector<RowBlock>& mpi_send = send.mpi;
  std::vector<RowBlock> mpi_recv;
  if (!here) mpi_recv = r.recv_peer;
  std::unique_ptr<PendingBlocks> pending = comm.post_blocks(x, token, mpi_send, std::vector<int>(mpi_send.size(), kRowTag),
                                                            recv, mpi_recv, std::vector<int>(mpi_recv.size(), kRowTag));
  const auto* xs = static_cast<const char*>(x.data_ptr());
  for (const auto& [b, off] : send.shared) {
    char* dst = m->segment(b.peer) + off;
    const int64_t first = b.offset;
    at::parallel_for(0, b.rows, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(H, 1)), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) copy_row_ahead(dst + i * rb, xs, idx, first + i, first + i1, src_rows, rb);
    });
  }
  // 3. The writers say they are done (each waits for its own writers) while the
  // rank's own rows are gathered into place.
  std::vector<int64_t> expect(static_cast<size_t>(W), 0);
  if (here)
    for (const RowBlock& b : r.recv_peer) expect[static_cast<size_t>(b.peer)] = 1;
  swap_values(comm, send.signal, expect, kSignalTag, [&] { gather_own(recv, x, token, r.own); });
  pending->wait();
  return recv;
}

// The combine through node memory. keep: the other ranks' rows are also copied
// into `back` as they are read (the backward's gate gradients need them).
at::Tensor node_combine(const at::Tensor& y, const at::Tensor& gate, const Route& r, const at::Tensor& choice,
                        Communicator& comm, const std::shared_ptr<NodeMemory>& m, bool keep, at::Tensor& back) {
  const int W = comm.size();
  const int64_t H = y.size(1), rb = row_bytes(y), R = r.recv_rows;
  const std::vector<std::vector<int64_t>> to = offsets_for_peers(*m, y, r.recv_peer, W);
  const bool mine_shared =
      std::any_of(to.begin(), to.end(), [](const auto& v) { return !v.empty() && v[0] >= 0; });
  at::Tensor where, weight;
  const auto at_peer = swap_values(comm, to, blocks_per_peer(r.send_peer, W), kOffsetTag,
                                   [&] { std::tie(where, weight) = r.sources(choice, gate); });
  std::vector<RowBlock> mpi_send;
  if (!mine_shared) mpi_send = r.recv_peer;
  const NodeSplit in = split_by_offsets(r.send_peer, at_peer, W);
  const std::vector<RowBlock>& mpi_recv = in.mpi;
  std::vector<const void*> rows(static_cast<size_t>(R + r.send_rows));
  const auto* ys = static_cast<const char*>(y.data_ptr());
  for (int64_t i = 0; i < R; ++i) rows[static_cast<size_t>(i)] = ys + i * rb;
  if (keep || !mpi_recv.empty()) back = at::empty({r.send_rows, H}, y.options());
  const at::Tensor into = back.defined() ? back : at::empty({0, H}, y.options());
  std::unique_ptr<PendingBlocks> pending = comm.post_blocks(y, {}, mpi_send, std::vector<int>(mpi_send.size(), kRowTag),
                                                            into, mpi_recv, std::vector<int>(mpi_recv.size(), kRowTag));
  if (back.defined()) {
    const auto* bs = static_cast<const char*>(back.data_ptr());
    for (const RowBlock& b : mpi_recv)
      for (int64_t i = 0; i < b.rows; ++i) rows[static_cast<size_t>(R + b.offset + i)] = bs + (b.offset + i) * rb;
  }
  for (const auto& [b, off] : in.shared) {
    const char* src = m->segment(b.peer) + off;
    for (int64_t i = 0; i < b.rows; ++i) rows[static_cast<size_t>(R + b.offset + i)] = src + i * rb;
  }
  pending->wait();
  at::Tensor out = gather_sum_rows(where, weight, r.top_k, y, rows, keep ? back : at::Tensor(), R);
  // The readers say they are done: until then no rank may free or overwrite the
  // outputs the others read.
  std::vector<int64_t> expect(static_cast<size_t>(W), 0);
  if (mine_shared)
    for (const RowBlock& b : r.recv_peer) expect[static_cast<size_t>(b.peer)] = 1;
  swap_values(comm, in.signal, expect, kSignalTag);
  return out;
}

struct DirectDispatchFn : public torch::autograd::Function<DirectDispatchFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x_in, const Route& r,
                            const at::Tensor& token, const at::Tensor& choice, Communicator* comm) {
    const at::Tensor x = x_in.contiguous();
    at::Tensor recv;
    if (const std::shared_ptr<NodeMemory> m = comm->node_memory()) {
      recv = node_dispatch(x, r, token, *comm, m);
    } else {
      recv = at::empty({r.recv_rows, x.size(1)}, x.options());
      comm->exchange_blocks(x, token, r.send_peer, recv, r.recv_peer, [&] { gather_own(recv, x, token, r.own); });
    }
    save(ctx, r, token, *comm);
    ctx->saved_data["choice"] = choice;
    ctx->saved_data["width"] = x.size(1);
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    return recv;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const Route r = Route::unflat(ctx->saved_data["route"].toIntVector());
    const at::Tensor token = ctx->saved_data["token"].toTensor();
    Communicator& comm = comm_of(ctx);
    // Every rank takes part in the reverse exchange, also when its rows did not reach the loss.
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    const at::Tensor gr = grads[0].defined() ? grads[0].to(dtype).contiguous()
                                             : at::zeros({r.recv_rows, ctx->saved_data["width"].toInt()}, dtype);
    at::Tensor back = at::empty({r.send_rows, gr.size(1)}, gr.options());
    at::Tensor where;
    comm.exchange_blocks(gr, {}, r.recv_peer, back, r.send_peer,
                         [&] { where = r.sources(ctx->saved_data["choice"].toTensor(), {}).first; });
    return {gather_sum(where, {}, r.top_k, gr, back), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct DirectCombineFn : public torch::autograd::Function<DirectCombineFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& y_in, const at::Tensor& gate_in,
                            const Route& r, const at::Tensor& token, const at::Tensor& choice, Communicator* comm,
                            bool keep) {
    const at::Tensor y = y_in.contiguous();
    const at::Tensor gate = gate_in.detach().to(at::kFloat).contiguous();
    at::Tensor back, out;  // back: the other ranks' rows, in send order
    if (const std::shared_ptr<NodeMemory> m = comm->node_memory()) {
      out = node_combine(y, gate, r, choice, *comm, m, keep, back);
    } else {
      back = at::empty({r.send_rows, y.size(1)}, y.options());
      at::Tensor where, weight;
      comm->exchange_blocks(y, {}, r.recv_peer, back, r.send_peer,
                            [&] { std::tie(where, weight) = r.sources(choice, gate); });
      out = gather_sum(where, weight, r.top_k, y, back);
    }
    save(ctx, r, token, *comm);
    ctx->saved_data["y"] = y;
    ctx->saved_data["back"] = back;
    ctx->saved_data["gate"] = gate;
    ctx->saved_data["gate_dtype"] = static_cast<int64_t>(gate_in.scalar_type());
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const Route r = Route::unflat(ctx->saved_data["route"].toIntVector());
    const at::Tensor token = ctx->saved_data["token"].toTensor();
    const at::Tensor y = ctx->saved_data["y"].toTensor(), back = ctx->saved_data["back"].toTensor();
    const at::Tensor gate = ctx->saved_data["gate"].toTensor();
    Communicator& comm = comm_of(ctx);
    const int64_t H = y.size(1);
    const at::Tensor g = grads[0].defined() ? grads[0].to(y.scalar_type()).contiguous()
                                            : at::zeros({r.tokens, H}, y.options());
    // d y[a] = gate[a] * g[token[a]]: the other ranks' rows are scaled here and sent
    // back; the own rows are written straight into the gradient while they travel.
    at::Tensor grad_y = at::empty({r.recv_rows, H}, y.options());
    const at::Tensor scaled = scaled_peer_rows(r, g, token, gate);
    at::Tensor grad_gate = at::empty({r.send_rows}, gate.options());
    comm.exchange_blocks(scaled, {}, r.send_peer, grad_y, r.recv_peer,
                         [&] { own_and_gate_grads(r, g, token, gate, y, back, grad_y, grad_gate); });
    const auto gate_dtype = static_cast<at::ScalarType>(ctx->saved_data["gate_dtype"].toInt());
    return {grad_y, grad_gate.to(gate_dtype), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};


// ---------------------------------------------------------------------------
// The pipelined exchange (pipelined_moe): the state of one layer call, shared by
// the dispatch, the experts' hooks and the combine, forward and backward.
enum Phase { kDispatch = 0, kReturn = 1, kOutputGrad = 2, kInputGrad = 3, kPhases = 4 };

struct Pipeline final : ExpertHooks {
  Communicator* comm = nullptr;
  Route route;
  at::Tensor token, choice;
  int chunks = 1, local = 0, most_local = 0;
  std::vector<int64_t> start;                 // first received row of each local expert; start[local] = recv rows
  std::vector<std::vector<RowBlock>> peer_in;  // per local expert: its blocks from other ranks (rows relative to recv)
  std::vector<int> peer_out_index;            // per block of route.send_peer: the expert's index on its rank
  int64_t width = 0;
  at::ScalarType dtype = at::kFloat;

  // Forward: the experts' rows per chunk, this rank's rows to the others, the
  // outputs coming back, each expert's outputs leaving.
  std::vector<std::unique_ptr<PendingBlocks>> rows_in;
  int rows_waited = 0;
  std::unique_ptr<PendingBlocks> rows_out, returned_in;
  std::vector<std::unique_ptr<PendingBlocks>> outputs_out;
  at::Tensor returned;  // [send rows, H]: the other ranks' expert outputs for this rank's choices, send order
  // Backward: the output gradients per chunk, this rank's to the others, the input
  // gradients coming back, each expert's input gradients leaving.
  std::vector<std::unique_ptr<PendingBlocks>> grads_in;
  std::vector<bool> grads_waited;
  std::unique_ptr<PendingBlocks> grads_out, input_grads_in;
  std::vector<std::unique_ptr<PendingBlocks>> input_grads_out;
  at::Tensor grad_y, input_grads;  // [recv rows, H], [send rows, H]

  int tag(Phase phase, int expert) const { return phase * most_local + expert; }
  int chunk_of(int expert) const { return static_cast<int>(static_cast<int64_t>(expert) * chunks / local); }
  std::vector<int> send_tags(Phase phase) const {
    std::vector<int> t;
    for (int i : peer_out_index) t.push_back(tag(phase, i));
    return t;
  }
  // The receive blocks of chunk j with their tags.
  std::pair<std::vector<RowBlock>, std::vector<int>> chunk_blocks(int j, Phase phase) const {
    std::pair<std::vector<RowBlock>, std::vector<int>> out;
    for (int i = 0; i < local; ++i)
      if (chunk_of(i) == j)
        for (const RowBlock& b : peer_in[static_cast<size_t>(i)]) {
          out.first.push_back(b);
          out.second.push_back(tag(phase, i));
        }
    return out;
  }
  // Expert i's blocks from other ranks, rows relative to its first row.
  std::vector<RowBlock> expert_blocks(int i) const {
    std::vector<RowBlock> v = peer_in[static_cast<size_t>(i)];
    for (RowBlock& b : v) b.offset -= start[static_cast<size_t>(i)];
    return v;
  }
  at::Tensor rows_like(int64_t n) const { return at::empty({n, width}, at::TensorOptions().dtype(dtype)); }
  at::Tensor empty_rows() const { return rows_like(0); }

  // The experts' hooks (ExpertHooks): wait for rows and gradients chunk by chunk,
  // send outputs and input gradients expert by expert.
  void rows_ready(int expert) override { wait_rows(chunk_of(expert)); }
  void outputs_done(int expert, const at::Tensor& y) override {
    TORCH_CHECK(y.scalar_type() == dtype && y.size(1) == width && y.is_contiguous(), "pipelined experts: expert ",
                expert, " wrote ", y.scalar_type(), " rows of ", y.size(1), ", expected contiguous ", dtype,
                " rows of ", width);
    const std::vector<RowBlock> blocks = expert_blocks(expert);
    outputs_out.push_back(
        comm->post_blocks(y, {}, blocks, std::vector<int>(blocks.size(), tag(kReturn, expert)), empty_rows(), {}, {}));
  }
  at::Tensor output_grad(int expert, const at::Tensor&) override {
    // The rows autograd passed are a slice of grad_y (the combine's backward returned
    // it); they are taken from the pipeline's own tensor, which the messages fill.
    wait_grads(chunk_of(expert));
    const int64_t s = start[static_cast<size_t>(expert)], n = start[static_cast<size_t>(expert) + 1] - s;
    return grad_y.narrow(0, s, n);
  }
  void input_grad_done(int expert, const at::Tensor& dx) override {
    const at::Tensor g = dx.to(dtype).contiguous();
    const std::vector<RowBlock> blocks = expert_blocks(expert);
    input_grads_out.push_back(
        comm->post_blocks(g, {}, blocks, std::vector<int>(blocks.size(), tag(kInputGrad, expert)), empty_rows(), {}, {}));
  }

  void wait_rows(int upto_chunk) {
    for (; rows_waited <= upto_chunk && rows_waited < chunks; ++rows_waited)
      rows_in[static_cast<size_t>(rows_waited)]->wait();
  }
  void wait_grads(int chunk) {
    if (grads_waited[static_cast<size_t>(chunk)]) return;
    grads_in[static_cast<size_t>(chunk)]->wait();
    grads_waited[static_cast<size_t>(chunk)] = true;
  }
};

using PipelinePtr = c10::intrusive_ptr<Pipeline>;
c10::IValue capsule(const PipelinePtr& p) { return c10::IValue::make_capsule(p); }
PipelinePtr pipeline_of(torch::autograd::AutogradContext* ctx) {
  return c10::static_intrusive_pointer_cast<Pipeline>(ctx->saved_data["pipeline"].toCapsule());
}

struct PipelinedDispatchFn : public torch::autograd::Function<PipelinedDispatchFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x_in, const PipelinePtr& p) {
    const at::Tensor x = x_in.contiguous();
    const Route& r = p->route;
    at::Tensor recv = p->rows_like(r.recv_rows);
    for (int j = 0; j < p->chunks; ++j) {
      auto [blocks, tags] = p->chunk_blocks(j, kDispatch);
      p->rows_in.push_back(p->comm->post_blocks(x, {}, {}, {}, recv, blocks, tags));
    }
    p->rows_out = p->comm->post_blocks(x, p->token, r.send_peer, p->send_tags(kDispatch), p->empty_rows(), {}, {});
    p->returned = p->rows_like(r.send_rows);
    p->returned_in = p->comm->post_blocks(x, {}, {}, {}, p->returned, r.send_peer, p->send_tags(kReturn));
    gather_own(recv, x, p->token, r.own);
    ctx->saved_data["pipeline"] = capsule(p);
    return recv;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const PipelinePtr p = pipeline_of(ctx);
    const Route& r = p->route;
    const at::Tensor gr = grads[0].defined() ? grads[0].to(p->dtype).contiguous() : p->rows_like(r.recv_rows).zero_();
    const at::Tensor where = r.sources(p->choice, {}).first;
    TORCH_CHECK(p->input_grads_in, "pipelined dispatch: backward without the combine's backward");
    p->input_grads_in->wait();
    for (auto& q : p->input_grads_out) q->wait();
    p->grads_out->wait();
    return {gather_sum(where, {}, r.top_k, gr, p->input_grads), at::Tensor()};
  }
};

struct PipelinedCombineFn : public torch::autograd::Function<PipelinedCombineFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& y_in, const at::Tensor& gate_in,
                            const PipelinePtr& p) {
    const Route& r = p->route;
    const at::Tensor y = y_in.contiguous();
    const at::Tensor gate = gate_in.detach().to(at::kFloat).contiguous();
    auto [where, weight] = r.sources(p->choice, gate);
    p->wait_rows(p->chunks - 1);  // chunks whose experts got no rows
    p->rows_out->wait();
    for (auto& q : p->outputs_out) q->wait();
    p->returned_in->wait();
    at::Tensor out = gather_sum(where, weight, r.top_k, y, p->returned);
    ctx->saved_data["pipeline"] = capsule(p);
    ctx->saved_data["y"] = y;
    ctx->saved_data["gate"] = gate;
    ctx->saved_data["gate_dtype"] = static_cast<int64_t>(gate_in.scalar_type());
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const PipelinePtr p = pipeline_of(ctx);
    const Route& r = p->route;
    const at::Tensor y = ctx->saved_data["y"].toTensor(), gate = ctx->saved_data["gate"].toTensor();
    const at::Tensor& token = p->token;
    const at::Tensor g = grads[0].defined() ? grads[0].to(y.scalar_type()).contiguous()
                                            : at::zeros({r.tokens, p->width}, y.options());
    // Receives first (the experts' gradients per chunk, then this rank's input
    // gradients), then d y[a] = gate[a] * g[token[a]] for the other ranks' rows, sent
    // at once; the own rows and the gates' gradients are computed while they travel.
    p->grad_y = p->rows_like(r.recv_rows);
    for (int j = 0; j < p->chunks; ++j) {
      auto [blocks, tags] = p->chunk_blocks(j, kOutputGrad);
      p->grads_in.push_back(p->comm->post_blocks(y, {}, {}, {}, p->grad_y, blocks, tags));
    }
    p->grads_waited.assign(static_cast<size_t>(p->chunks), false);
    p->input_grads = p->rows_like(r.send_rows);
    p->input_grads_in = p->comm->post_blocks(y, {}, {}, {}, p->input_grads, r.send_peer, p->send_tags(kInputGrad));
    const at::Tensor scaled = scaled_peer_rows(r, g, token, gate);
    p->grads_out = p->comm->post_blocks(scaled, {}, r.send_peer, p->send_tags(kOutputGrad), p->empty_rows(), {}, {});
    at::Tensor grad_gate = at::empty({r.send_rows}, gate.options());
    own_and_gate_grads(r, g, token, gate, y, p->returned, p->grad_y, grad_gate);
    const auto gate_dtype = static_cast<at::ScalarType>(ctx->saved_data["gate_dtype"].toInt());
    // grad_y's rows from other ranks are still in flight: each expert's backward
    // waits for its chunk (Pipeline::output_grad) and reads them from p->grad_y.
    return {p->grad_y, grad_gate.to(gate_dtype), at::Tensor()};
  }
};

void check_input_rows(const at::Tensor& t, int64_t rows, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.device().is_cpu(), "direct exchange: ", what, " must be [",
              rows, ", H] on the CPU, got ", t.sizes(), " on ", t.device());
}

}  // namespace

at::Tensor direct_dispatch(const at::Tensor& x, const DispatchPlan& plan, Communicator& comm) {
  check_input_rows(x, plan.num_tokens, "x");
  return DirectDispatchFn::apply(x, Route::of(plan, comm.rank()), plan.token.contiguous(), plan.choice.contiguous(),
                                 &comm);
}

at::Tensor direct_combine(const at::Tensor& y, const DispatchPlan& plan, Communicator& comm) {
  check_input_rows(y, plan.recv_rows, "y");
  // The other ranks' rows are kept for the backward only where there will be one.
  const bool keep = at::GradMode::is_enabled() && (y.requires_grad() || plan.gate.requires_grad());
  return DirectCombineFn::apply(y, plan.gate, Route::of(plan, comm.rank()), plan.token.contiguous(),
                                plan.choice.contiguous(), &comm, keep);
}

namespace {
constexpr int kMaxTag = 0x3fff;  // below the tag of exchange_blocks

// Per send block: the index of its expert among the destination rank's local
// experts (send blocks are listed per destination, one per its local expert in order).
std::vector<int> expert_on_peer(const DispatchPlan& plan) {
  std::vector<int> index;
  int run = 0, peer = -1;
  for (const RowBlock& b : plan.send_blocks) {
    run = b.peer == peer ? run + 1 : 0;
    peer = b.peer;
    index.push_back(run);
  }
  return index;
}

// The most local experts of any rank.
int most_local(const DispatchPlan& plan) {
  const std::vector<int> index = expert_on_peer(plan);
  return index.empty() ? 0 : 1 + *std::max_element(index.begin(), index.end());
}
}  // namespace

bool pipelines(const DispatchPlan& plan, const Communicator& comm, int chunks) {
  return chunks > 1 && comm.size() > 1 && comm.posts_blocks() && kPhases * most_local(plan) <= kMaxTag;
}

at::Tensor pipelined_moe(const at::Tensor& x, const DispatchPlan& plan, Communicator& comm, int chunks,
                         const std::function<at::Tensor(const at::Tensor&, const ExpertHooksPtr&)>& experts) {
  check_input_rows(x, plan.num_tokens, "x");
  TORCH_CHECK(pipelines(plan, comm, chunks), "pipelined experts: not available for this plan and communicator");
  auto p = c10::make_intrusive<Pipeline>();
  p->comm = &comm;
  p->route = Route::of(plan, comm.rank());
  p->token = plan.token.contiguous();
  p->choice = plan.choice.contiguous();
  p->local = static_cast<int>(plan.expert_counts.size());
  p->chunks = std::max(1, std::min(chunks, p->local));
  p->most_local = most_local(plan);
  p->width = x.size(1);
  p->dtype = x.scalar_type();
  p->start.assign(1, 0);
  for (int64_t n : plan.expert_counts) p->start.push_back(p->start.back() + n);
  // Receive blocks are listed per source rank, each in local expert order.
  p->peer_in.resize(static_cast<size_t>(p->local));
  for (size_t b = 0; b < plan.recv_blocks.size(); ++b)
    if (plan.recv_blocks[b].peer != comm.rank())
      p->peer_in[b % static_cast<size_t>(p->local)].push_back(plan.recv_blocks[b]);
  const std::vector<int> index = expert_on_peer(plan);  // route.send_peer keeps the other ranks' blocks in order
  for (size_t b = 0; b < plan.send_blocks.size(); ++b)
    if (plan.send_blocks[b].peer != comm.rank()) p->peer_out_index.push_back(index[b]);
  const at::Tensor in = PipelinedDispatchFn::apply(x, p);
  const at::Tensor out = experts(in, p);
  return PipelinedCombineFn::apply(out, plan.gate, p);
}

}  // namespace moeprune
