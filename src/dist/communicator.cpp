#include "dist/communicator.h"

#include <climits>
#include <exception>
#include <numeric>

#include "core/error.h"
#include "core/log.h"
#include "dist/node_memory.h"

namespace moeprune {
namespace {

void mpi_check(int rc, const char* what) {
  if (rc != MPI_SUCCESS) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    throw std::runtime_error(concat("MPI ", what, " failed: ", std::string(msg, len)));
  }
}

std::vector<int64_t> out_shape(const at::Tensor& like, int64_t rows) {
  std::vector<int64_t> shape(like.sizes().begin(), like.sizes().end());
  if (shape.empty()) shape.push_back(rows);
  else shape[0] = rows;
  return shape;
}

MPI_Datatype mpi_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return MPI_FLOAT;
    case at::kDouble: return MPI_DOUBLE;
    case at::kLong: return MPI_INT64_T;
    case at::kInt: return MPI_INT32_T;
    case at::kByte: return MPI_UINT8_T;
    case at::kChar: return MPI_INT8_T;
    case at::kBool: return MPI_C_BOOL;
    default: return MPI_DATATYPE_NULL;
  }
}

constexpr int64_t kChunkBytes = int64_t{1} << 30;

}  // namespace

int64_t row_bytes(const at::Tensor& t) {
  int64_t elems = 1;
  for (int64_t d = 1; d < t.dim(); ++d) elems *= t.size(d);
  return elems * static_cast<int64_t>(t.element_size());
}

void check_splits(const Communicator& comm, const at::Tensor& send, const std::vector<int64_t>& send_splits,
                  const std::vector<int64_t>& recv_splits) {
  const size_t w = static_cast<size_t>(comm.size());
  if (send_splits.size() != w || recv_splits.size() != w)
    throw std::invalid_argument(concat("all_to_all: ", send_splits.size(), " send and ", recv_splits.size(),
                                    " recv splits for ", w, " ranks"));
  int64_t total = 0;
  for (int64_t s : send_splits) {
    if (s < 0) throw std::invalid_argument("all_to_all: negative send split");
    total += s;
  }
  for (int64_t s : recv_splits)
    if (s < 0) throw std::invalid_argument("all_to_all: negative recv split");
  const int64_t rows = send.dim() == 0 ? 1 : send.size(0);
  if (total != rows)
    throw std::invalid_argument(concat("all_to_all: send splits sum to ", total, " but the tensor has ", rows, " rows"));
}

at::Tensor check_blocks_alloc(const Communicator& comm, const at::Tensor& send, const std::vector<RowBlock>& send_blocks,
                              int64_t recv_rows, const std::vector<RowBlock>& recv_blocks) {
  TORCH_CHECK(send.dim() >= 1, "all_to_all_blocks: the send tensor needs a row dimension");
  auto check = [&](const std::vector<RowBlock>& blocks, int64_t rows, const char* side) {
    int64_t covered = 0;
    for (const RowBlock& b : blocks) {
      if (b.peer < 0 || b.peer >= comm.size() || b.rows < 0 || b.offset < 0 || b.offset + b.rows > rows)
        throw std::invalid_argument(concat("all_to_all_blocks: ", side, " block {peer ", b.peer, ", offset ", b.offset,
                                           ", rows ", b.rows, "} outside ", comm.size(), " ranks x ", rows, " rows"));
      covered += b.rows;
    }
    return covered;
  };
  check(send_blocks, send.size(0), "send");
  const int64_t covered = check(recv_blocks, recv_rows, "receive");
  const auto shape = out_shape(send, recv_rows);
  return covered < recv_rows ? at::zeros(shape, send.options()) : at::empty(shape, send.options());
}

int copy_self_blocks(const at::Tensor& send, const std::vector<RowBlock>& send_blocks, at::Tensor& recv,
                     const std::vector<RowBlock>& recv_blocks, int self) {
  std::vector<const RowBlock*> out, in;
  for (const RowBlock& b : send_blocks)  // empty blocks carry nothing and pair with nothing (as over MPI)
    if (b.peer == self && b.rows) out.push_back(&b);
  for (const RowBlock& b : recv_blocks)
    if (b.peer == self && b.rows) in.push_back(&b);
  if (out.size() != in.size())
    throw std::invalid_argument(concat("all_to_all_blocks: rank ", self, " sends itself ", out.size(),
                                       " blocks but receives ", in.size()));
  int copies = 0;
  int64_t so = 0, ro = 0, rows = 0;  // the run being collected
  const auto flush = [&] {
    if (rows) {
      recv.narrow(0, ro, rows).copy_(send.narrow(0, so, rows));
      ++copies;
    }
    rows = 0;
  };
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i]->rows != in[i]->rows)
      throw std::invalid_argument(concat("all_to_all_blocks: rank ", self, "'s block ", i, " to itself sends ",
                                         out[i]->rows, " rows but receives ", in[i]->rows));
    if (rows && out[i]->offset == so + rows && in[i]->offset == ro + rows) {
      rows += out[i]->rows;
      continue;
    }
    flush();
    so = out[i]->offset;
    ro = in[i]->offset;
    rows = out[i]->rows;
  }
  flush();
  return copies;
}

bool check_exchange_blocks(const Communicator& comm, int64_t send_rows, const std::vector<RowBlock>& send_blocks,
                           const at::Tensor& recv, const std::vector<RowBlock>& recv_blocks) {
  bool any = false;
  const auto check = [&](const std::vector<RowBlock>& blocks, int64_t rows, const char* side) {
    for (const RowBlock& b : blocks) {
      if (b.peer < 0 || b.peer >= comm.size() || b.peer == comm.rank() || b.rows < 0 || b.offset < 0 ||
          b.offset + b.rows > rows || b.rows > INT_MAX)
        throw std::invalid_argument(concat("exchange_blocks: ", side, " block {peer ", b.peer, ", offset ", b.offset,
                                           ", rows ", b.rows, "} is not a block of another of ", comm.size(),
                                           " ranks than ", comm.rank(), " inside ", rows, " rows"));
      any = any || b.rows > 0;
    }
  };
  check(send_blocks, send_rows, "send");
  check(recv_blocks, recv.dim() ? recv.size(0) : 0, "receive");
  return any;
}

void Communicator::exchange_blocks(const at::Tensor& src, const at::Tensor& rows,
                                   const std::vector<RowBlock>& send_blocks, at::Tensor& recv,
                                   const std::vector<RowBlock>& recv_blocks, const std::function<void()>& meanwhile) {
  const int64_t send_rows = rows.defined() ? rows.size(0) : src.size(0);
  if (check_exchange_blocks(*this, send_rows, send_blocks, recv, recv_blocks)) {
    const at::Tensor payload = rows.defined() ? src.index_select(0, rows) : src;
    const at::Tensor got = all_to_all_blocks(payload, send_blocks, recv.size(0), recv_blocks);
    for (const RowBlock& b : recv_blocks)
      if (b.rows) recv.narrow(0, b.offset, b.rows).copy_(got.narrow(0, b.offset, b.rows));
  }
  if (meanwhile) meanwhile();
}

void PendingBlocks::wait_after(const std::function<void()>& meanwhile) {
  std::exception_ptr local_error;
  try {
    if (meanwhile) meanwhile();
  } catch (...) {
    local_error = std::current_exception();
  }
  wait();
  if (local_error) std::rethrow_exception(local_error);
}

std::unique_ptr<PendingBlocks> Communicator::post_blocks(const at::Tensor&, const at::Tensor&,
                                                         const std::vector<RowBlock>&, const std::vector<int>&,
                                                         const at::Tensor&, const std::vector<RowBlock>&,
                                                         const std::vector<int>&) {
  throw std::logic_error("Communicator::post_blocks: this backend cannot leave messages in flight (posts_blocks())");
}

// ---------------------------------------------------------------------------
at::Tensor SelfCommunicator::all_to_all_blocks(const at::Tensor& send, const std::vector<RowBlock>& send_blocks,
                                               int64_t recv_rows, const std::vector<RowBlock>& recv_blocks) {
  at::Tensor recv = check_blocks_alloc(*this, send, send_blocks, recv_rows, recv_blocks);
  copy_self_blocks(send, send_blocks, recv, recv_blocks, 0);
  return recv;
}

at::Tensor SelfCommunicator::all_to_all(const at::Tensor& send, const std::vector<int64_t>& send_splits,
                                        const std::vector<int64_t>& recv_splits) {
  check_splits(*this, send, send_splits, recv_splits);
  if (send_splits[0] != recv_splits[0])
    throw std::invalid_argument("all_to_all: single process must receive what it sends");
  return send.clone();
}

std::vector<int64_t> SelfCommunicator::exchange_counts(const std::vector<int64_t>& send, int block) {
  if (static_cast<int>(send.size()) != block) throw std::invalid_argument("exchange_counts: size mismatch");
  return send;
}

void SelfCommunicator::send(const at::Tensor&, int, int) {
  throw std::logic_error("SelfCommunicator::send: a single process has no peer");
}
void SelfCommunicator::recv(at::Tensor&, int, int) {
  throw std::logic_error("SelfCommunicator::recv: a single process has no peer");
}

// ---------------------------------------------------------------------------
MpiCommunicator::MpiCommunicator(MPI_Comm comm) : comm_(comm) {
  mpi_check(MPI_Comm_rank(comm_, &rank_), "Comm_rank");
  mpi_check(MPI_Comm_size(comm_, &size_), "Comm_size");
}

at::Tensor MpiCommunicator::all_to_all(const at::Tensor& send_in, const std::vector<int64_t>& send_splits,
                                       const std::vector<int64_t>& recv_splits) {
  check_splits(*this, send_in, send_splits, recv_splits);
  TORCH_CHECK(send_in.device().is_cpu(), "MpiCommunicator::all_to_all needs a CPU tensor");
  at::Tensor send = send_in.contiguous();
  const int64_t total_recv = std::accumulate(recv_splits.begin(), recv_splits.end(), int64_t{0});
  at::Tensor recv = at::empty(out_shape(send, total_recv), send.options());
  const int64_t rb = row_bytes(send);
  if (rb == 0) return recv;
  // One datatype element = one row; counts and displacements are in rows.
  MPI_Datatype row;
  mpi_check(MPI_Type_contiguous(static_cast<int>(rb), MPI_BYTE, &row), "Type_contiguous");
  mpi_check(MPI_Type_commit(&row), "Type_commit");
  std::vector<int> sc(size_), sd(size_), rc(size_), rd(size_);
  int64_t so = 0, ro = 0;
  for (int r = 0; r < size_; ++r) {
    if (send_splits[r] > INT_MAX || recv_splits[r] > INT_MAX || so > INT_MAX || ro > INT_MAX)
      throw std::runtime_error("MpiCommunicator::all_to_all: more than 2^31 rows in one exchange");
    sc[r] = static_cast<int>(send_splits[r]);
    sd[r] = static_cast<int>(so);
    rc[r] = static_cast<int>(recv_splits[r]);
    rd[r] = static_cast<int>(ro);
    so += send_splits[r];
    ro += recv_splits[r];
  }
  const int rcode = MPI_Alltoallv(send.data_ptr(), sc.data(), sd.data(), row, recv.data_ptr(), rc.data(), rd.data(),
                                  row, comm_);
  MPI_Type_free(&row);
  mpi_check(rcode, "Alltoallv");
  return recv;
}

at::Tensor MpiCommunicator::all_to_all_blocks(const at::Tensor& send_in, const std::vector<RowBlock>& send_blocks,
                                              int64_t recv_rows, const std::vector<RowBlock>& recv_blocks) {
  TORCH_CHECK(send_in.device().is_cpu(), "MpiCommunicator::all_to_all_blocks needs a CPU tensor");
  at::Tensor send = send_in.contiguous();
  at::Tensor recv = check_blocks_alloc(*this, send, send_blocks, recv_rows, recv_blocks);
  const int64_t rb = row_bytes(send);
  if (rb == 0) return recv;
  MPI_Datatype row;
  mpi_check(MPI_Type_contiguous(static_cast<int>(rb), MPI_BYTE, &row), "Type_contiguous");
  mpi_check(MPI_Type_commit(&row), "Type_commit");
  constexpr int kTag = 0x6d70;  // private to this exchange; same-tag messages between a pair keep their order
  const auto* sbase = static_cast<const char*>(send.data_ptr());
  auto* rbase = static_cast<char*>(recv.data_ptr());
  std::vector<MPI_Request> req;
  req.reserve(send_blocks.size() + recv_blocks.size());
  for (const auto* blocks : {&send_blocks, &recv_blocks})
    for (const RowBlock& b : *blocks)
      if (b.rows > INT_MAX) throw std::runtime_error("all_to_all_blocks: more than 2^31 rows in one block");
  int rc = MPI_SUCCESS;
  for (const RowBlock& b : recv_blocks) {
    if (b.rows == 0 || b.peer == rank_) continue;
    req.emplace_back();
    rc = MPI_Irecv(rbase + b.offset * rb, static_cast<int>(b.rows), row, b.peer, kTag, comm_, &req.back());
    if (rc != MPI_SUCCESS) break;
  }
  for (const RowBlock& b : send_blocks) {
    if (rc != MPI_SUCCESS || b.rows == 0 || b.peer == rank_) continue;
    req.emplace_back();
    rc = MPI_Isend(sbase + b.offset * rb, static_cast<int>(b.rows), row, b.peer, kTag, comm_, &req.back());
  }
  // The rank's own blocks are copied while the others' are in flight.
  std::exception_ptr self_error;
  try {
    if (rc == MPI_SUCCESS) copy_self_blocks(send, send_blocks, recv, recv_blocks, rank_);
  } catch (...) {
    self_error = std::current_exception();  // after the wait: no request is left pending
  }
  if (rc == MPI_SUCCESS) rc = MPI_Waitall(static_cast<int>(req.size()), req.data(), MPI_STATUSES_IGNORE);
  MPI_Type_free(&row);
  mpi_check(rc, "all_to_all_blocks (Isend/Irecv/Waitall)");
  if (self_error) std::rethrow_exception(self_error);
  return recv;
}

namespace {

// The requests of one post_blocks call and what they use.
class MpiPendingBlocks final : public PendingBlocks {
 public:
  MpiPendingBlocks(at::Tensor src, at::Tensor rows, at::Tensor recv)
      : src_(std::move(src)), rows_(std::move(rows)), recv_(std::move(recv)) {}
  ~MpiPendingBlocks() override { finish(); }
  void wait() override { mpi_check(finish(), "exchange (Isend/Irecv/Waitall)"); }

  std::vector<MPI_Request> req;
  std::vector<MPI_Datatype> types;  // freed after the wait

 private:
  int finish() {
    if (done_) return MPI_SUCCESS;
    done_ = true;
    const int rc = req.empty() ? MPI_SUCCESS : MPI_Waitall(static_cast<int>(req.size()), req.data(), MPI_STATUSES_IGNORE);
    for (MPI_Datatype& t : types) MPI_Type_free(&t);
    src_ = rows_ = recv_ = at::Tensor();
    return rc;
  }
  at::Tensor src_, rows_, recv_;
  bool done_ = false;
};

}  // namespace

std::unique_ptr<PendingBlocks> MpiCommunicator::post_blocks(const at::Tensor& src, const at::Tensor& rows,
                                                            const std::vector<RowBlock>& send_blocks,
                                                            const std::vector<int>& send_tags, const at::Tensor& recv,
                                                            const std::vector<RowBlock>& recv_blocks,
                                                            const std::vector<int>& recv_tags) {
  TORCH_CHECK(src.device().is_cpu() && recv.device().is_cpu(), "MpiCommunicator::post_blocks needs CPU tensors");
  TORCH_CHECK(src.dim() >= 1 && src.is_contiguous() && recv.is_contiguous() && src.dtype() == recv.dtype() &&
                  row_bytes(src) == row_bytes(recv),
              "MpiCommunicator::post_blocks: src and recv must be contiguous with rows of the same type and size");
  TORCH_CHECK(!rows.defined() || (rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous() &&
                                  rows.device().is_cpu() && src.size(0) <= INT_MAX),
              "MpiCommunicator::post_blocks: rows must be a contiguous int64 CPU vector over < 2^31 source rows");
  TORCH_CHECK(send_tags.size() == send_blocks.size() && recv_tags.size() == recv_blocks.size(),
              "MpiCommunicator::post_blocks: one tag per block");
  for (const auto* tags : {&send_tags, &recv_tags})
    for (int t : *tags) TORCH_CHECK(t >= 0 && t < (1 << 14), "MpiCommunicator::post_blocks: tag ", t, " outside [0, 2^14)");
  const int64_t send_rows = rows.defined() ? rows.size(0) : src.size(0);
  const int64_t rb = row_bytes(src);
  auto pending = std::make_unique<MpiPendingBlocks>(src, rows, recv);
  if (!check_exchange_blocks(*this, send_rows, send_blocks, recv, recv_blocks) || rb == 0) return pending;
  // Every gathered index is checked before anything is posted (MPI would read past
  // src; failing half-way would leave the peers waiting).
  const int64_t* idx = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
  const int64_t src_rows = src.size(0);
  if (idx)
    for (const RowBlock& b : send_blocks)
      for (int64_t i = b.offset; i < b.offset + b.rows; ++i)
        if (idx[i] < 0 || idx[i] >= src_rows)
          throw std::invalid_argument(concat("exchange_blocks: row index ", idx[i], " outside the ", src_rows,
                                             " source rows"));
  MPI_Datatype row;
  mpi_check(MPI_Type_contiguous(static_cast<int>(rb), MPI_BYTE, &row), "Type_contiguous");
  mpi_check(MPI_Type_commit(&row), "Type_commit");
  pending->types.push_back(row);
  const auto* sbase = static_cast<const char*>(src.data_ptr());
  auto* rbase = static_cast<char*>(recv.data_ptr());
  std::vector<MPI_Request>& req = pending->req;
  req.reserve(send_blocks.size() + recv_blocks.size());
  int rc = MPI_SUCCESS;
  for (size_t i = 0; i < recv_blocks.size() && rc == MPI_SUCCESS; ++i) {
    const RowBlock& b = recv_blocks[i];
    if (b.rows == 0) continue;
    req.emplace_back();
    rc = MPI_Irecv(rbase + b.offset * rb, static_cast<int>(b.rows), row, b.peer, recv_tags[i], comm_, &req.back());
  }
  std::vector<int> displ;
  for (size_t i = 0; i < send_blocks.size() && rc == MPI_SUCCESS; ++i) {
    const RowBlock& b = send_blocks[i];
    if (b.rows == 0) continue;
    if (!idx) {
      req.emplace_back();
      rc = MPI_Isend(sbase + b.offset * rb, static_cast<int>(b.rows), row, b.peer, send_tags[i], comm_, &req.back());
      continue;
    }
    // The rows go out through an indexed datatype over src: MPI reads them where
    // they are, no packed copy of ours.
    displ.resize(static_cast<size_t>(b.rows));
    for (int64_t j = 0; j < b.rows; ++j) displ[static_cast<size_t>(j)] = static_cast<int>(idx[b.offset + j]);
    MPI_Datatype t;
    rc = MPI_Type_create_indexed_block(static_cast<int>(b.rows), 1, displ.data(), row, &t);
    if (rc == MPI_SUCCESS) rc = MPI_Type_commit(&t);
    if (rc != MPI_SUCCESS) break;
    pending->types.push_back(t);
    req.emplace_back();
    rc = MPI_Isend(sbase, 1, t, b.peer, send_tags[i], comm_, &req.back());
  }
  if (rc != MPI_SUCCESS) {
    // Posted requests are completed before the error is reported, so that no buffer is left in use.
    pending.reset();
    mpi_check(rc, "exchange (Isend/Irecv)");
  }
  return pending;
}

void MpiCommunicator::exchange_blocks(const at::Tensor& src, const at::Tensor& rows,
                                      const std::vector<RowBlock>& send_blocks, at::Tensor& recv,
                                      const std::vector<RowBlock>& recv_blocks, const std::function<void()>& meanwhile) {
  constexpr int kTag = 0x3fff;  // private to this exchange: one tag, so messages of a pair match in order
  std::unique_ptr<PendingBlocks> pending =
      post_blocks(src, rows, send_blocks, std::vector<int>(send_blocks.size(), kTag), recv, recv_blocks,
                  std::vector<int>(recv_blocks.size(), kTag));
  pending->wait_after(meanwhile);
}

std::shared_ptr<NodeMemory> MpiCommunicator::node_memory() {
  if (!node_tried_) {
    node_tried_ = true;
    if (size_ > 1) {
      std::string why;
      node_ = NodeMemory::create(comm_, &why);
      if (!node_ && rank_ == 0) log::info(concat("node memory: not used by the ", size_, "-rank exchange (", why, ")"));
    }
  }
  return node_;
}

std::vector<int64_t> MpiCommunicator::exchange_counts(const std::vector<int64_t>& send, int block) {
  if (static_cast<int64_t>(send.size()) != static_cast<int64_t>(size_) * block)
    throw std::invalid_argument("exchange_counts: expected size()*block values");
  std::vector<int64_t> recv(send.size());
  mpi_check(MPI_Alltoall(send.data(), block, MPI_INT64_T, recv.data(), block, MPI_INT64_T, comm_), "Alltoall");
  return recv;
}

void MpiCommunicator::all_reduce(at::Tensor& t, ReduceOp op) {
  TORCH_CHECK(t.device().is_cpu(), "MpiCommunicator::all_reduce needs a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), "MpiCommunicator::all_reduce needs a contiguous tensor");
  MPI_Datatype dt = mpi_type(t.scalar_type());
  if (dt == MPI_DATATYPE_NULL) {  // bf16 / fp16: reduce in float32
    at::Tensor f = t.to(at::kFloat);
    all_reduce(f, op);
    t.copy_(f);
    return;
  }
  const MPI_Op mop = op == ReduceOp::Sum ? MPI_SUM : MPI_MAX;
  const int64_t n = t.numel();
  const int64_t step = INT_MAX / 2;
  auto* base = static_cast<char*>(t.data_ptr());
  for (int64_t off = 0; off < n; off += step) {
    const int cnt = static_cast<int>(std::min(step, n - off));
    mpi_check(MPI_Allreduce(MPI_IN_PLACE, base + off * t.element_size(), cnt, dt, mop, comm_), "Allreduce");
  }
}

namespace {
struct Done final : PendingCollective {
  void wait() override {}
};

// MPI_Iallreduce requests over the chunks of one tensor.
struct MpiPending final : PendingCollective {
  at::Tensor keep;  // the buffer, alive until the requests complete
  std::vector<MPI_Request> requests;
  ~MpiPending() override {
    if (!requests.empty()) MPI_Waitall(static_cast<int>(requests.size()), requests.data(), MPI_STATUSES_IGNORE);
  }
  void wait() override {
    if (requests.empty()) return;
    const int rc = MPI_Waitall(static_cast<int>(requests.size()), requests.data(), MPI_STATUSES_IGNORE);
    requests.clear();
    mpi_check(rc, "Waitall (Iallreduce)");
  }
};
}  // namespace

std::unique_ptr<PendingCollective> Communicator::all_reduce_start(at::Tensor& t, ReduceOp op) {
  all_reduce(t, op);
  return std::make_unique<Done>();
}

std::unique_ptr<PendingCollective> MpiCommunicator::all_reduce_start(at::Tensor& t, ReduceOp op) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "MpiCommunicator::all_reduce_start needs a contiguous CPU tensor");
  const MPI_Datatype dt = mpi_type(t.scalar_type());
  if (dt == MPI_DATATYPE_NULL) return Communicator::all_reduce_start(t, op);  // bf16 / fp16: blocking, in float32
  auto p = std::make_unique<MpiPending>();
  p->keep = t;
  const MPI_Op mop = op == ReduceOp::Sum ? MPI_SUM : MPI_MAX;
  const int64_t n = t.numel();
  const int64_t step = INT_MAX / 2;
  auto* base = static_cast<char*>(t.data_ptr());
  for (int64_t off = 0; off < n; off += step) {
    MPI_Request req;
    const int cnt = static_cast<int>(std::min(step, n - off));
    mpi_check(MPI_Iallreduce(MPI_IN_PLACE, base + off * t.element_size(), cnt, dt, mop, comm_, &req), "Iallreduce");
    p->requests.push_back(req);
  }
  return p;
}

void MpiCommunicator::broadcast(at::Tensor& t, int root) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "MpiCommunicator::broadcast needs a contiguous CPU tensor");
  auto* base = static_cast<char*>(t.data_ptr());
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  for (int64_t off = 0; off < bytes; off += kChunkBytes)
    mpi_check(MPI_Bcast(base + off, static_cast<int>(std::min(kChunkBytes, bytes - off)), MPI_BYTE, root, comm_),
              "Bcast");
}

at::Tensor MpiCommunicator::all_gather(const at::Tensor& t_in) {
  TORCH_CHECK(t_in.device().is_cpu(), "MpiCommunicator::all_gather needs a CPU tensor");
  at::Tensor t = t_in.contiguous();
  std::vector<int64_t> shape{size_};
  shape.insert(shape.end(), t.sizes().begin(), t.sizes().end());
  at::Tensor out = at::empty(shape, t.options());
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  if (bytes == 0) return out;
  MPI_Datatype blob;
  mpi_check(MPI_Type_contiguous(static_cast<int>(bytes), MPI_BYTE, &blob), "Type_contiguous");
  MPI_Type_commit(&blob);
  const int rc = MPI_Allgather(t.data_ptr(), 1, blob, out.data_ptr(), 1, blob, comm_);
  MPI_Type_free(&blob);
  mpi_check(rc, "Allgather");
  return out;
}

void MpiCommunicator::send(const at::Tensor& t_in, int dst, int tag) {
  TORCH_CHECK(t_in.device().is_cpu(), "MpiCommunicator::send needs a CPU tensor");
  at::Tensor t = t_in.contiguous();
  auto* base = static_cast<const char*>(t.data_ptr());
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  for (int64_t off = 0; off < bytes; off += kChunkBytes)
    mpi_check(MPI_Send(base + off, static_cast<int>(std::min(kChunkBytes, bytes - off)), MPI_BYTE, dst, tag, comm_),
              "Send");
}

void MpiCommunicator::recv(at::Tensor& t, int src, int tag) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "MpiCommunicator::recv needs a contiguous CPU tensor");
  auto* base = static_cast<char*>(t.data_ptr());
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  for (int64_t off = 0; off < bytes; off += kChunkBytes)
    mpi_check(MPI_Recv(base + off, static_cast<int>(std::min(kChunkBytes, bytes - off)), MPI_BYTE, src, tag, comm_,
                       MPI_STATUS_IGNORE),
              "Recv");
}

void MpiCommunicator::barrier() { mpi_check(MPI_Barrier(comm_), "Barrier"); }

}  // namespace moeprune
