// Collective and point-to-point communication of tensors between ranks. The
// backend follows the device: MpiCommunicator for CPU tensors, NcclCommunicator
// (nccl_communicator.h, CUDA builds) for CUDA tensors, SelfCommunicator for a
// single process without MPI (unit tests, the single-process oracle).
#pragma once
#include <ATen/ATen.h>
#include <mpi.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

namespace moeprune {

class NodeMemory;  // dist/node_memory.h

enum class ReduceOp { Sum, Max };

// A block of rows of a local buffer exchanged with one peer: rows
// [offset, offset + rows). See Communicator::all_to_all_blocks.
struct RowBlock {
  int peer = 0;
  int64_t offset = 0;
  int64_t rows = 0;
};

// A collective started by Communicator::all_reduce_start; wait() completes it (the
// tensor then holds the result; on a GPU: for work queued after wait() on the
// current stream).
class PendingCollective {
 public:
  virtual ~PendingCollective() = default;
  virtual void wait() = 0;
};

// Point-to-point messages started by Communicator::post_blocks. wait() completes
// them (the buffers may then be read and reused); the destructor waits for any
// that are left, so that no buffer stays in use.
class PendingBlocks {
 public:
  virtual ~PendingBlocks() = default;
  virtual void wait() = 0;
  // Runs `meanwhile` (if any) while the messages travel, then waits; an exception of
  // `meanwhile` is rethrown after the wait, so that no request is left pending.
  void wait_after(const std::function<void()>& meanwhile);
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual c10::DeviceType device_type() const = 0;

  // send: [sum(send_splits), ...] rows grouped by destination rank (rank order);
  // returns [sum(recv_splits), ...] rows grouped by source rank. Zero splits allowed.
  virtual at::Tensor all_to_all(const at::Tensor& send, const std::vector<int64_t>& send_splits,
                                const std::vector<int64_t>& recv_splits) = 0;
  // All-to-all in blocks, so that rows land where the caller wants them without a
  // permutation pass. The send blocks for peer p (in vector order) pair one-to-one,
  // in order, with p's receive blocks for this rank, and paired blocks have the
  // same number of rows (zero-row blocks pair with zero-row blocks). Returns
  // [recv_rows, ...]; rows no receive block covers are zero.
  virtual at::Tensor all_to_all_blocks(const at::Tensor& send, const std::vector<RowBlock>& send_blocks,
                                       int64_t recv_rows, const std::vector<RowBlock>& recv_blocks) = 0;
  // The exchange of all_to_all_blocks between distinct ranks only, into a buffer
  // the caller owns, gathering the payload on the way, with local work in flight:
  // send block b carries src rows rows[b.offset .. b.offset + b.rows) (rows
  // undefined: src rows b.offset ..), receive block b fills recv rows [b.offset,
  // b.offset + b.rows); rows no block covers are left as they are. Blocks with
  // peer == rank() are refused: the caller moves its own rows in `meanwhile`, which
  // runs while the other ranks' rows are in flight where the backend allows (MPI:
  // after posting, before waiting; the others: after the exchange). Pairing as in
  // all_to_all_blocks. MPI sends gathered rows through an indexed datatype (no
  // packing pass of ours); the default gathers with index_select first.
  virtual void exchange_blocks(const at::Tensor& src, const at::Tensor& rows, const std::vector<RowBlock>& send_blocks,
                               at::Tensor& recv, const std::vector<RowBlock>& recv_blocks,
                               const std::function<void()>& meanwhile);
  // One side or both of a block exchange, started and not waited for, so that the
  // caller can compute while the rows travel and wait for them piece by piece:
  // send block i carries src rows as in exchange_blocks and goes out with tag
  // send_tags[i]; receive block i fills recv rows [offset, offset + rows) from a
  // message of tag recv_tags[i]. Messages of one (peer, tag) match in the order
  // they are posted, on both sides. The handle keeps src, rows and recv alive;
  // they must not be written (recv: not read) before wait(). Tags in [0, 2^14).
  // Only backends that can leave messages in flight offer it (posts_blocks()).
  virtual bool posts_blocks() const { return false; }
  virtual std::unique_ptr<PendingBlocks> post_blocks(const at::Tensor& src, const at::Tensor& rows,
                                                     const std::vector<RowBlock>& send_blocks,
                                                     const std::vector<int>& send_tags, const at::Tensor& recv,
                                                     const std::vector<RowBlock>& recv_blocks,
                                                     const std::vector<int>& recv_tags);
  // send: `block` int64 values per destination rank (size()*block values);
  // returns the `block` values each source rank sent here (size()*block values).
  // Always a host-side exchange: split sizes are needed on the host.
  virtual std::vector<int64_t> exchange_counts(const std::vector<int64_t>& send, int block) = 0;
  virtual void all_reduce(at::Tensor& t, ReduceOp op) = 0;  // in place
  // Starts an in-place all-reduce of the contiguous t and returns at once where the
  // backend can (MPI: MPI_Iallreduce; NCCL: on a side stream after the work queued
  // so far on the current one), so that computation overlaps it. t must stay alive
  // and unchanged until wait(). Every rank starts the same collectives in the same
  // order. The default runs all_reduce now.
  virtual std::unique_ptr<PendingCollective> all_reduce_start(at::Tensor& t, ReduceOp op);
  virtual void broadcast(at::Tensor& t, int root) = 0;       // in place
  virtual at::Tensor all_gather(const at::Tensor& t) = 0;    // returns [size(), ...t.sizes()]
  virtual void send(const at::Tensor& t, int dst, int tag) = 0;
  virtual void recv(at::Tensor& t, int src, int tag) = 0;    // t preallocated with the right shape
  virtual void barrier() = 0;
  // Memory every rank of this communicator reads and writes in place (one node,
  // host memory; dist/node_memory.h), or null where there is none. Collective on
  // the first call, which every rank makes at the same point; then a lookup.
  virtual std::shared_ptr<NodeMemory> node_memory() { return nullptr; }
};

// One process, no MPI: every collective is the identity.
class SelfCommunicator final : public Communicator {
 public:
  explicit SelfCommunicator(c10::DeviceType dev = c10::kCPU) : dev_(dev) {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
  c10::DeviceType device_type() const override { return dev_; }
  at::Tensor all_to_all(const at::Tensor& send, const std::vector<int64_t>& send_splits,
                        const std::vector<int64_t>& recv_splits) override;
  at::Tensor all_to_all_blocks(const at::Tensor& send, const std::vector<RowBlock>& send_blocks, int64_t recv_rows,
                               const std::vector<RowBlock>& recv_blocks) override;
  std::vector<int64_t> exchange_counts(const std::vector<int64_t>& send, int block) override;
  void all_reduce(at::Tensor&, ReduceOp) override {}
  void broadcast(at::Tensor&, int) override {}
  at::Tensor all_gather(const at::Tensor& t) override { return t.unsqueeze(0).clone(); }
  void send(const at::Tensor&, int, int) override;
  void recv(at::Tensor&, int, int) override;
  void barrier() override {}

 private:
  c10::DeviceType dev_;
};

// MPI on host memory. Payloads are moved as rows of a contiguous datatype, so a
// 2^31 element count is never reached in practice; broadcast, send and recv
// chunk at 1 GiB.
class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm);  // does not take ownership
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  c10::DeviceType device_type() const override { return c10::kCPU; }
  MPI_Comm handle() const { return comm_; }
  at::Tensor all_to_all(const at::Tensor& send, const std::vector<int64_t>& send_splits,
                        const std::vector<int64_t>& recv_splits) override;
  at::Tensor all_to_all_blocks(const at::Tensor& send, const std::vector<RowBlock>& send_blocks, int64_t recv_rows,
                               const std::vector<RowBlock>& recv_blocks) override;
  void exchange_blocks(const at::Tensor& src, const at::Tensor& rows, const std::vector<RowBlock>& send_blocks,
                       at::Tensor& recv, const std::vector<RowBlock>& recv_blocks,
                       const std::function<void()>& meanwhile) override;
  bool posts_blocks() const override { return true; }
  std::unique_ptr<PendingBlocks> post_blocks(const at::Tensor& src, const at::Tensor& rows,
                                             const std::vector<RowBlock>& send_blocks, const std::vector<int>& send_tags,
                                             const at::Tensor& recv, const std::vector<RowBlock>& recv_blocks,
                                             const std::vector<int>& recv_tags) override;
  std::vector<int64_t> exchange_counts(const std::vector<int64_t>& send, int block) override;
  void all_reduce(at::Tensor& t, ReduceOp op) override;
  std::unique_ptr<PendingCollective> all_reduce_start(at::Tensor& t, ReduceOp op) override;
  void broadcast(at::Tensor& t, int root) override;
  at::Tensor all_gather(const at::Tensor& t) override;
  void send(const at::Tensor& t, int dst, int tag) override;
  void recv(at::Tensor& t, int src, int tag) override;
  void barrier() override;
  std::shared_ptr<NodeMemory> node_memory() override;

 private:
  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
  bool node_tried_ = false;
  std::shared_ptr<NodeMemory> node_;
};

// Checks blocks against the communicator size and the buffers' rows; returns the
// receive buffer (zeros where no receive block writes, uninitialised elsewhere).
at::Tensor check_blocks_alloc(const Communicator& comm, const at::Tensor& send, const std::vector<RowBlock>& send_blocks,
                              int64_t recv_rows, const std::vector<RowBlock>& recv_blocks);

// Checks the blocks of exchange_blocks: peers in range and never `self`, send
// blocks inside `send_rows` rows, receive blocks inside recv's rows, at most 2^31
// rows per block. Returns whether any block carries rows.
bool check_exchange_blocks(const Communicator& comm, int64_t send_rows, const std::vector<RowBlock>& send_blocks,
                           const at::Tensor& recv, const std::vector<RowBlock>& recv_blocks);

// Bytes of one row (dim 0) of t: the unit all-to-alls move.
int64_t row_bytes(const at::Tensor& t);
// Copies the blocks a rank sends to itself (peer == self) into recv: the i-th non-empty
// send block to self fills the i-th non-empty receive block from self (the order in which
// MPI and NCCL match messages between one pair of ranks); runs of blocks that are adjacent
// on both sides are copied at once. Throws when the self blocks do not pair up.
// Returns the number of copies made.
int copy_self_blocks(const at::Tensor& send, const std::vector<RowBlock>& send_blocks, at::Tensor& recv,
                     const std::vector<RowBlock>& recv_blocks, int self);

// Checks split vectors against the communicator size and the tensor's rows.
void check_splits(const Communicator& comm, const at::Tensor& send, const std::vector<int64_t>& send_splits,
                  const std::vector<int64_t>& recv_splits);

}  // namespace moeprune
