// Communicator over MPI: all-to-all-v with uneven and zero splits, its autograd
// reverse, all-reduce, broadcast, all-gather, send/recv.
#include <gtest/gtest.h>

#include <algorithm>

#include "dist/all_to_all.h"
#include "dist/mesh.h"
#include "dist/node_memory.h"
#include "test_world.h"

namespace moeprune::test {
namespace {

// Rank s sends (s + d) % 3 rows to rank d (some zero); row values encode (s, d, i).
std::vector<int64_t> splits_from(int s, int W) {
  std::vector<int64_t> out(W);
  for (int d = 0; d < W; ++d) out[d] = (s + d) % 3;
  return out;
}

at::Tensor payload(int s, int W) {
  std::vector<float> v;
  const auto sp = splits_from(s, W);
  for (int d = 0; d < W; ++d)
    for (int64_t i = 0; i < sp[d]; ++i) {
      v.push_back(1000.f * s + 10.f * d + i);
      v.push_back(-1.f * s);
    }
  return at::tensor(v).reshape({-1, 2});
}

TEST(Comm, AllToAllUnevenAndZeroSplits) {
  auto& comm = g_world->host_comm();
  const int W = comm.size(), me = comm.rank();
  std::vector<int64_t> recv(W);
  for (int s = 0; s < W; ++s) recv[s] = splits_from(s, W)[me];
  at::Tensor got = comm.all_to_all(payload(me, W), splits_from(me, W), recv);
  int64_t row = 0;
  for (int s = 0; s < W; ++s)
    for (int64_t i = 0; i < recv[s]; ++i, ++row) {
      EXPECT_EQ(got[row][0].item<float>(), 1000.f * s + 10.f * me + i);
      EXPECT_EQ(got[row][1].item<float>(), -1.f * s);
    }
  EXPECT_EQ(row, got.size(0));
}

TEST(Comm, ExchangeCounts) {
  auto& comm = g_world->host_comm();
  const int W = comm.size(), me = comm.rank();
  std::vector<int64_t> send;
  for (int d = 0; d < W; ++d) {
    send.push_back(100 * me + d);
    send.push_back(-d);
  }
  const auto got = comm.exchange_counts(send, 2);
  for (int s = 0; s < W; ++s) {
    EXPECT_EQ(got[2 * s], 100 * s + me);
    EXPECT_EQ(got[2 * s + 1], -me);
  }
}

TEST(Comm, AllToAllBackwardIsReverse) {
  auto& comm = g_world->host_comm();
  const int W = comm.size(), me = comm.rank();
  std::vector<int64_t> recv(W);
  for (int s = 0; s < W; ++s) recv[s] = splits_from(s, W)[me];
  at::Tensor x = payload(me, W).requires_grad_(true);
  at::Tensor y = all_to_all_autograd(x, splits_from(me, W), recv, comm);
  // d/dx sum(y * y) = 2x once the gradient is routed back to its origin.
  (y * y).sum().backward();
  EXPECT_TRUE(at::equal(x.grad(), 2 * x.detach()));
}

// Block all-to-all: rank s sends 3 blocks to each rank d, block i holding
// (s + d + i) % 3 rows (some zero); send blocks are interleaved across peers in the
// send buffer and the receiver places them in reverse order in its buffer.
int64_t block_rows(int s, int d, int i) { return (s + d + i) % 3; }

TEST(Comm, AllToAllBlocksPlacesRowsWhereAsked) {
  auto& comm = g_world->host_comm();
  const int W = comm.size(), me = comm.rank();
  std::vector<RowBlock> send_blocks, recv_blocks;
  std::vector<float> v;
  int64_t off = 0;
  for (int i = 0; i < 3; ++i)  // send buffer order: block-major, then peer
    for (int d = 0; d < W; ++d) {
      const int64_t n = block_rows(me, d, i);
      send_blocks.push_back({d, off, n});
      for (int64_t j = 0; j < n; ++j) v.push_back(1000.f * me + 100.f * d + 10.f * i + j);
      off += n;
    }
  // Blocks to one peer must be listed in pairing order: sort the list by (peer, i) stably.
  std::stable_sort(send_blocks.begin(), send_blocks.end(), [](const RowBlock& a, const RowBlock& b) { return a.peer < b.peer; });
  int64_t total = 0;
  for (int s = 0; s < W; ++s)
    for (int i = 0; i < 3; ++i) total += block_rows(s, me, i);
  int64_t end = total;
  for (int s = 0; s < W; ++s)
    for (int i = 0; i < 3; ++i) {
      const int64_t n = block_rows(s, me, i);
      end -= n;
      recv_blocks.push_back({s, end, n});
    }
  at::Tensor send = at::tensor(v).reshape({-1, 1}).expand({-1, 3}).contiguous();
  at::Tensor got = comm.all_to_all_blocks(send, send_blocks, total + 2, recv_blocks);  // 2 rows nobody writes
  ASSERT_EQ(got.size(0), total + 2);
  for (const RowBlock& b : recv_blocks) {
    const int i = static_cast<int>(&b - recv_blocks.data()) % 3;
    for (int64_t j = 0; j < b.rows; ++j)
      EXPECT_EQ(got[b.offset + j][2].item<float>(), 1000.f * b.peer + 100.f * me + 10.f * i + j);
  }
  EXPECT_EQ(got.narrow(0, total, 2).abs().sum().item<float>(), 0.f) << "uncovered rows are zero";
  // Autograd: the gradient goes back to the rows it came from.
  at::Tensor x = send.clone().requires_grad_(true);
  at::Tensor y = all_to_all_blocks_autograd(x, send_blocks, total + 2, recv_blocks, comm);
  (y * y).sum().backward();
  EXPECT_TRUE(at::equal(x.grad(), 2 * x.detach()));
  // Bad blocks are refused with the block named.
  EXPECT_THROW(comm.all_to_all_blocks(send, {{W, 0, 1}}, 0, {}), std::invalid_argument);
}

// exchange_blocks: the rows other ranks receive are the gathered source rows (MPI:
// through an indexed datatype), exactly what index_select + all_to_all_blocks
// deliver; the local work runs once; the rank's own blocks are refused, as is a
// row index outside the source, before anything is posted (no rank waits).
TEST(Comm, ExchangeBlocksGathersRowsForOtherRanks) {
  auto& comm = g_world->host_comm();
  const int W = comm.size(), me = comm.rank();
  const int64_t H = 5, N = 40;
  at::Tensor src = at::arange(N * H, at::kFloat).reshape({N, H}) + 1000.f * me;
  // To every other rank d: block i of block_rows(me, d, i) rows, drawn from src in a scrambled order.
  std::vector<RowBlock> send_blocks, recv_blocks, peer_send, peer_recv;
  std::vector<int64_t> rows;
  for (int d = 0; d < W; ++d)
    for (int i = 0; i < 3; ++i) {
      const int64_t n = block_rows(me, d, i);
      send_blocks.push_back({d, static_cast<int64_t>(rows.size()), n});
      if (d != me) peer_send.push_back(send_blocks.back());
      for (int64_t j = 0; j < n; ++j) rows.push_back((7 * static_cast<int64_t>(rows.size()) + 3 * d + i) % N);
    }
  int64_t off = 0;
  for (int s = 0; s < W; ++s)
    for (int i = 0; i < 3; ++i) {
      recv_blocks.push_back({s, off, block_rows(s, me, i)});
      if (s != me) peer_recv.push_back(recv_blocks.back());
      off += recv_blocks.back().rows;
    }
  const at::Tensor index = at::tensor(rows, at::kLong);
  const at::Tensor want = comm.all_to_all_blocks(src.index_select(0, index), send_blocks, off, recv_blocks);
  at::Tensor got = at::full({off, H}, -1.f);
  int calls = 0;
  comm.exchange_blocks(src, index, peer_send, got, peer_recv, [&] { ++calls; });
  EXPECT_EQ(calls, 1);
  for (const RowBlock& b : recv_blocks) {
    const at::Tensor g = got.narrow(0, b.offset, b.rows), w = want.narrow(0, b.offset, b.rows);
    if (b.peer == me) EXPECT_TRUE(at::equal(g, at::full_like(g, -1.f))) << "own rows are the caller's";
    else EXPECT_TRUE(at::equal(g, w)) << "rows from rank " << b.peer;
  }
  // Contiguous payload (no index): the same rows.
  at::Tensor got2 = at::full({off, H}, -1.f);
  comm.exchange_blocks(src.index_select(0, index), {}, peer_send, got2, peer_recv, {});
  EXPECT_TRUE(at::equal(got2, got));
  // Refusals, the same on every rank.
  EXPECT_THROW(comm.exchange_blocks(src, {}, {{me, 0, 1}}, got, {}, {}), std::invalid_argument);
  if (W > 1) {
    at::Tensor bad = index.clone();
    bad.fill_(N);  // one past the last row
    EXPECT_THROW(comm.exchange_blocks(src, bad, peer_send, got, peer_recv, {}), std::invalid_argument);
  }
}

TEST(Comm, AllReduceBroadcastGather) {
  auto& comm = g_world->host_comm();
  const int W = comm.size(), me = comm.rank();
  at::Tensor s = at::full({3}, static_cast<double>(me + 1));
  comm.all_reduce(s, ReduceOp::Sum);
  EXPECT_EQ(s[0].item<double>(), W * (W + 1) / 2.0);
  at::Tensor m = at::tensor({static_cast<int64_t>(me), static_cast<int64_t>(-me)});
  comm.all_reduce(m, ReduceOp::Max);
  EXPECT_EQ(m[0].item<int64_t>(), W - 1);
  EXPECT_EQ(m[1].item<int64_t>(), 0);
  at::Tensor h = at::full({2}, 1.5, at::kBFloat16) * (me + 1);
  comm.all_reduce(h, ReduceOp::Sum);
  EXPECT_EQ(h[0].item<float>(), 1.5f * W * (W + 1) / 2);

  at::Tensor b = me == W - 1 ? at::arange(5, at::kFloat) : at::zeros({5});
  comm.broadcast(b, W - 1);
  EXPECT_TRUE(at::equal(b, at::arange(5, at::kFloat)));

  at::Tensor g = comm.all_gather(at::full({2, 2}, static_cast<float>(me)));
  ASSERT_EQ(g.size(0), W);
  for (int r = 0; r < W; ++r) EXPECT_EQ(g[r].sum().item<float>(), 4.f * r);
}

TEST(Comm, SendRecvRing) {
  auto& comm = g_world->host_comm();
  const int W = comm.size(), me = comm.rank();
  if (W == 1) GTEST_SKIP() << "send/recv needs two ranks";
  at::Tensor out = at::arange(7, at::kLong) + 10 * me;
  at::Tensor in = at::empty({7}, at::kLong);
  // Even ranks send first, odd ranks receive first: no deadlock for any W.
  const int next = (me + 1) % W, prev = (me + W - 1) % W;
  if (me % 2 == 0) {
    comm.send(out, next, 7);
    comm.recv(in, prev, 7);
  } else {
    comm.recv(in, prev, 7);
    comm.send(out, next, 7);
  }
  EXPECT_TRUE(at::equal(in, at::arange(7, at::kLong) + 10 * prev));
}

}  // namespace
}  // namespace moeprune::test

namespace moeprune::test {
namespace {

// The sub-communicators of every mesh W = D x N, on the compute device (NCCL
// communicators per group on GPUs, MPI ones on CPUs), split even when D = 1:
// an all-reduce over each axis sums the right ranks, an all-to-all inside an
// expert-parallel group reaches the right peers.
// Node memory (dist/node_memory.h): every rank sees what every other rank wrote
// into its segment, at the offset that rank reports; freed blocks are reused first
// fit and coalesce; the limit and a full segment give no block (the caller's
// fallback); tensors made in it give their block back when freed.
TEST(NodeMemory, SegmentsMappedEverywhereAndBlocksReused) {
  auto& host = g_world->host_comm();
  MPI_Comm dup;
  MPI_Comm_dup(host.handle(), &dup);
  {
    std::string why;
    const std::shared_ptr<NodeMemory> m = NodeMemory::create(dup, &why);
    ASSERT_NE(m, nullptr) << why;
    auto* mine = static_cast<int64_t*>(m->allocate(3 * sizeof(int64_t)));
    ASSERT_NE(mine, nullptr);
    mine[0] = 1000 + host.rank(), mine[1] = 7, mine[2] = -host.rank();
    at::Tensor off = host.all_gather(at::tensor({m->offset_of(mine, 3 * sizeof(int64_t))}, at::kLong));
    host.barrier();
    for (int r = 0; r < host.size(); ++r) {
      const auto* theirs = reinterpret_cast<const int64_t*>(m->segment(r) + off[r][0].item<int64_t>());
      EXPECT_EQ(theirs[0], 1000 + r);
      EXPECT_EQ(theirs[2], -r);
    }
    host.barrier();  // nobody reads mine any more
    EXPECT_EQ(m->offset_of(&why, 1), -1) << "a pointer outside the segment";
    // First fit with reuse and coalescing (blocks are whole pages).
    m->release(mine);
    EXPECT_EQ(m->in_use(), 0u);
    void* a = m->allocate(10000);
    void* b = m->allocate(5000);
    ASSERT_TRUE(a && b);
    EXPECT_EQ(static_cast<char*>(b) - static_cast<char*>(a), 12288) << "10000 bytes take three pages";
    m->release(a);
    EXPECT_EQ(m->allocate(8000), a) << "the freed block is reused first";
    m->release(a);
    m->release(b);
    EXPECT_EQ(m->allocate(16384), a) << "neighbouring free blocks coalesce";
    m->release(a);
    // The limit, and tensors.
    m->set_limit(8192);
    EXPECT_EQ(m->allocate(8193), nullptr);
    EXPECT_FALSE(node_empty(m, {4, 1024}, at::kFloat).defined()) << "16 KiB over an 8 KiB limit";
    m->set_limit(SIZE_MAX);
    EXPECT_EQ(m->allocate(m->segment_bytes()), nullptr) << "more than the segment";
    {
      at::Tensor t = node_empty(m, {4, 1024}, at::kFloat);
      ASSERT_TRUE(t.defined());
      EXPECT_GE(m->offset_of(t.data_ptr(), t.nbytes()), 0);
      EXPECT_EQ(m->in_use(), 16384u);
    }
    EXPECT_EQ(m->in_use(), 0u) << "a freed tensor gives its block back";
    EXPECT_GE(m->peak(), 16384u);
  }
  MPI_Comm_free(&dup);
}

TEST(Mesh, SubCommunicatorsOnTheDevice) {
  World& w = *g_world;
  const int W = w.size(), r = w.rank();
  const auto dev = w.device();
  RecordProperty("device", dev.str());
  if (w.rank() == 0) std::printf("mesh sub-communicators on %s\n", dev.str().c_str());
  for (int N = 1; N <= W; ++N) {
    if (W % N != 0) continue;
    SCOPED_TRACE(concat("mesh ", W / N, " x ", N, " on ", dev.str()));
    Mesh mesh(w.host_comm(), w.comm(), N, dev.is_cuda() ? dev.index() : -1, /*always_split=*/true);
    const Comms c = mesh.comms();
    ASSERT_NE(c.ep_device, nullptr);
    ASSERT_NE(c.edp_device, nullptr);
    EXPECT_EQ(c.ep().size(), N);
    EXPECT_EQ(c.ep().rank(), r % N);
    EXPECT_EQ(c.edp_device->size(), W / N);
    EXPECT_EQ(c.edp_device->rank(), r / N);
    EXPECT_EQ(c.ep().device_type(), dev.type());
    const int g = r / N, p = r % N;
    at::Tensor x = at::full({3}, static_cast<double>(r), at::TensorOptions().dtype(at::kDouble).device(dev));
    c.ep().all_reduce(x, ReduceOp::Sum);  // ranks g*N .. g*N+N-1
    EXPECT_EQ(x.cpu()[0].item<double>(), g * N * N + N * (N - 1) / 2.0);
    at::Tensor y = at::full({2}, static_cast<double>(r), at::TensorOptions().dtype(at::kDouble).device(dev));
    c.edp_device->all_reduce(y, ReduceOp::Sum);  // ranks p, N+p, ...
    const int D = W / N;
    EXPECT_EQ(y.cpu()[1].item<double>(), p * D + N * D * (D - 1) / 2.0);
    // All-to-all inside the group: position q receives one row from each position s, value 100*s + q.
    std::vector<int64_t> one(static_cast<size_t>(N), 1);
    at::Tensor send = (at::arange(N, at::TensorOptions().dtype(at::kFloat)) + 100.f * p).reshape({N, 1}).to(dev);
    at::Tensor got = c.ep().all_to_all(send, one, one).cpu();
    for (int s = 0; s < N; ++s) EXPECT_EQ(got[s][0].item<float>(), 100.f * s + p);
    // Blocks inside the group (two per peer, the rank's own ones as device copies):
    // position p sends peer q the rows 10*p + q (block 0) and 10*p + q + 0.5 (block 1);
    // it receives them in reverse block order, peers in order.
    {
      std::vector<RowBlock> sb, rb;
      std::vector<float> v;
      for (int q = 0; q < N; ++q)
        for (int i = 0; i < 2; ++i) {
          sb.push_back({q, static_cast<int64_t>(v.size()), 1});
          v.push_back(10.f * p + q + 0.5f * i);
        }
      for (int q = 0; q < N; ++q)
        for (int i = 0; i < 2; ++i) rb.push_back({q, 2 * q + 1 - i, 1});
      at::Tensor blocks = c.ep().all_to_all_blocks(at::tensor(v).reshape({-1, 1}).to(dev), sb, 2 * N, rb).cpu();
      for (int q = 0; q < N; ++q) {
        EXPECT_EQ(blocks[2 * q + 1][0].item<float>(), 10.f * q + p) << "from " << q;
        EXPECT_EQ(blocks[2 * q][0].item<float>(), 10.f * q + p + 0.5f) << "from " << q;
      }
    }
    // A started all-reduce (NCCL: on a side stream) completes on wait(), after the
    // work queued before it, while other work is queued meanwhile.
    at::Tensor z = at::full({1 << 16}, 1.0, at::TensorOptions().dtype(at::kFloat).device(dev)) * (r + 1);
    auto pending = c.edp_device->all_reduce_start(z, ReduceOp::Sum);
    at::Tensor other = at::ones({256, 256}, at::TensorOptions().device(dev))
                           .matmul(at::ones({256, 256}, at::TensorOptions().device(dev)));
    pending->wait();
    const double want = D * (p + 1) + N * D * (D - 1) / 2.0;  // sum over g of (g*N + p + 1)
    EXPECT_EQ(z.min().cpu().item<float>(), want);
    EXPECT_EQ(z.max().cpu().item<float>(), want);
    EXPECT_EQ(other[0][0].cpu().item<float>(), 256.f);
    // The dense-gradient communicator: all W ranks, a communicator of its own.
    if (W > 1) {
      ASSERT_NE(c.grad_device, nullptr);
      EXPECT_NE(c.grad_device, c.device);
      EXPECT_EQ(c.grad().size(), W);
      at::Tensor q = at::full({4}, 1.0, at::TensorOptions().dtype(at::kFloat).device(dev));
      c.grad().all_reduce_start(q, ReduceOp::Sum)->wait();
      EXPECT_EQ(q.cpu()[3].item<float>(), static_cast<float>(W));
    }
  }
}

}  // namespace
}  // namespace moeprune::test
