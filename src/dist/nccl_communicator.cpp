#include "dist/nccl_communicator.h"

#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <optional>

#include "core/error.h"

namespace moeprune {
namespace {

void nccl_check(ncclResult_t rc, const char* what) {
  if (rc != ncclSuccess) throw std::runtime_error(concat("NCCL ", what, " failed: ", ncclGetErrorString(rc)));
}
void cuda_check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess) throw std::runtime_error(concat("CUDA ", what, " failed: ", cudaGetErrorString(rc)));
}

ncclDataType_t nccl_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ncclFloat32;
    case at::kDouble: return ncclFloat64;
    case at::kHalf: return ncclFloat16;
    case at::kBFloat16: return ncclBfloat16;
    case at::kLong: return ncclInt64;
    case at::kInt: return ncclInt32;
    case at::kByte: return ncclUint8;
    case at::kChar: return ncclInt8;
    case at::kBool: return ncclUint8;
    default: throw std::invalid_argument(concat("NCCL: unsupported dtype ", t));
  }
}

// An all-reduce queued on the communicator's side stream: wait() makes the current
// stream wait for it (no host synchronisation).
struct NcclPending final : PendingCollective {
  at::cuda::CUDAEvent done;
  c10::DeviceIndex device = 0;
  void wait() override { done.block(c10::cuda::getCurrentCUDAStream(device)); }
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(MpiCommunicator& mpi, int device_index) : mpi_(mpi), device_(device_index) {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    ncclUniqueId id;
    if (mpi_.rank() == 0) nccl_check(ncclGetUniqueId(&id), "GetUniqueId");
    at::Tensor blob = at::from_blob(&id, {static_cast<int64_t>(sizeof(id))}, at::kByte);
    mpi_.broadcast(blob, 0);
    nccl_check(ncclCommInitRank(&comm_, mpi_.size(), id, mpi_.rank()), "CommInitRank");
  }
  ~NcclCommunicator() override {
    if (comm_) ncclCommDestroy(comm_);
  }

  int rank() const override { return mpi_.rank(); }
  int size() const override { return mpi_.size(); }
  c10::DeviceType device_type() const override { return c10::kCUDA; }

  at::Tensor all_to_all(const at::Tensor& send_in, const std::vector<int64_t>& send_splits,
                        const std::vector<int64_t>& recv_splits) override {
    check_splits(*this, send_in, send_splits, recv_splits);
    check_device(send_in);
    at::Tensor send = send_in.contiguous();
    int64_t total = 0;
    for (int64_t s : recv_splits) total += s;
    std::vector<int64_t> shape(send.sizes().begin(), send.sizes().end());
    shape[0] = total;
    at::Tensor recv = at::empty(shape, send.options());
    const size_t row = static_cast<size_t>(row_bytes(send));
    auto stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream();
    const auto* sbase = static_cast<const char*>(send.data_ptr());
    auto* rbase = static_cast<char*>(recv.data_ptr());
    size_t so = 0, ro = 0;
    nccl_check(ncclGroupStart(), "GroupStart");
    for (int r = 0; r < size(); ++r) {
      const size_t sb = static_cast<size_t>(send_splits[r]) * row;
      const size_t rb = static_cast<size_t>(recv_splits[r]) * row;
      if (sb) nccl_check(ncclSend(sbase + so, sb, ncclUint8, r, comm_, stream), "Send");
      if (rb) nccl_check(ncclRecv(rbase + ro, rb, ncclUint8, r, comm_, stream), "Recv");
      so += sb;
      ro += rb;
    }
    nccl_check(ncclGroupEnd(), "GroupEnd");
    return recv;
  }

  at::Tensor all_to_all_blocks(const at::Tensor& send_in, const std::vector<RowBlock>& send_blocks, int64_t recv_rows,
                               const std::vector<RowBlock>& recv_blocks) override {
    check_device(send_in);
    at::Tensor send = send_in.contiguous();
    at::Tensor recv = check_blocks_alloc(*this, send, send_blocks, recv_rows, recv_blocks);
    const size_t row = static_cast<size_t>(row_bytes(send));
    if (row == 0) return recv;
    auto stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream();
    const auto* sbase = static_cast<const char*>(send.data_ptr());
    auto* rbase = static_cast<char*>(recv.data_ptr());
    // The rank's blocks to itself are device copies on the same stream (adjacent ones
    // merged): through NCCL they were one send/receive pair each, 2 x E calls per
    // exchange on one GPU.
    const int me = rank();
    copy_self_blocks(send, send_blocks, recv, recv_blocks, me);
    bool remote = false;
    for (const RowBlock& b : send_blocks) remote = remote || (b.rows && b.peer != me);
    for (const RowBlock& b : recv_blocks) remote = remote || (b.rows && b.peer != me);
    if (!remote) return recv;
    // Several sends to one peer inside a group are matched in order by NCCL.
    nccl_check(ncclGroupStart(), "GroupStart");
    for (const RowBlock& b : send_blocks)
      if (b.rows && b.peer != me)
        nccl_check(ncclSend(sbase + b.offset * row, b.rows * row, ncclUint8, b.peer, comm_, stream), "Send");
    for (const RowBlock& b : recv_blocks)
      if (b.rows && b.peer != me)
        nccl_check(ncclRecv(rbase + b.offset * row, b.rows * row, ncclUint8, b.peer, comm_, stream), "Recv");
    nccl_check(ncclGroupEnd(), "GroupEnd");
    return recv;
  }

  std::vector<int64_t> exchange_counts(const std::vector<int64_t>& send, int block) override {
    return mpi_.exchange_counts(send, block);
  }

  void all_reduce(at::Tensor& t, ReduceOp op) override {
    check_device(t);
    TORCH_CHECK(t.is_contiguous(), "NCCL all_reduce needs a contiguous tensor");
    nccl_check(ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t.scalar_type()),
                             op == ReduceOp::Sum ? ncclSum : ncclMax, comm_, stream()),
               "AllReduce");
  }

  std::unique_ptr<PendingCollective> all_reduce_start(at::Tensor& t, ReduceOp op) override {
    check_device(t);
    TORCH_CHECK(t.is_contiguous(), "NCCL all_reduce_start needs a contiguous tensor");
    const auto dev = static_cast<c10::DeviceIndex>(device_);
    const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(dev);
    if (!side_) side_ = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, dev);
    at::cuda::CUDAEvent ready;
    ready.record(current);  // the gradient is written by work queued so far
    ready.block(*side_);
    nccl_check(ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t.scalar_type()),
                             op == ReduceOp::Sum ? ncclSum : ncclMax, comm_, side_->stream()),
               "AllReduce (side stream)");
    t.record_stream(*side_);  // the allocator keeps t until the side stream is done with it
    auto p = std::make_unique<NcclPending>();
    p->device = dev;
    p->done.record(*side_);
    return p;
  }
  void broadcast(at::Tensor& t, int root) override {
    check_device(t);
    TORCH_CHECK(t.is_contiguous(), "NCCL broadcast needs a contiguous tensor");
    nccl_check(ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel() * t.element_size(), ncclUint8, root, comm_,
                             stream()),
               "Broadcast");
  }

  at::Tensor all_gather(const at::Tensor& t_in) override {
    check_device(t_in);
    at::Tensor t = t_in.contiguous();
    std::vector<int64_t> shape{size()};
    shape.insert(shape.end(), t.sizes().begin(), t.sizes().end());
    at::Tensor out = at::empty(shape, t.options());
    nccl_check(ncclAllGather(t.data_ptr(), out.data_ptr(), t.numel() * t.element_size(), ncclUint8, comm_, stream()),
               "AllGather");
    return out;
  }

  void send(const at::Tensor& t_in, int dst, int /*tag*/) override {
    check_device(t_in);
    at::Tensor t = t_in.contiguous();
    nccl_check(ncclSend(t.data_ptr(), t.numel() * t.element_size(), ncclUint8, dst, comm_, stream()), "Send");
    // Keep the source alive until the stream has consumed it.
    t.record_stream(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)));
  }

  void recv(at::Tensor& t, int src, int /*tag*/) override {
    check_device(t);
    TORCH_CHECK(t.is_contiguous(), "NCCL recv needs a contiguous tensor");
    nccl_check(ncclRecv(t.data_ptr(), t.numel() * t.element_size(), ncclUint8, src, comm_, stream()), "Recv");
  }

  void barrier() override {
    cuda_check(cudaStreamSynchronize(stream()), "StreamSynchronize");
    mpi_.barrier();
  }

 private:
  cudaStream_t stream() const {
    return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream();
  }
  void check_device(const at::Tensor& t) const {
    TORCH_CHECK(t.is_cuda() && t.get_device() == device_, "NCCL communicator of cuda:", device_,
                " got a tensor on ", t.device());
  }

  MpiCommunicator& mpi_;
  int device_;
  ncclComm_t comm_ = nullptr;
  std::optional<c10::cuda::CUDAStream> side_;  // all_reduce_start's stream
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(MpiCommunicator& mpi, int device_index) {
  return std::make_unique<NcclCommunicator>(mpi, device_index);
}

}  // namespace moeprune
