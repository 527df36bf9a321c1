// Collective and point-to-point communication of tensors between ranks. The
// backend follows the device: MpiCommunicator for CPU tensors, NcclCommunicator
// (nccl_communicator.h, CUDA builds) for CUDA tensors, SelfCommunicator for a
// single process without MPI (unit tests, the single-process oracle).
#pragma once
#include <ATen/ATen.h>
#include <mpi.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace moeprune {

enum class ReduceOp { Sum, Max };

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
  // send: `block` int64 values per destination rank (size()*block values);
  // returns the `block` values each source rank sent here (size()*block values).
  // Always a host-side exchange: split sizes are needed on the host.
  virtual std::vector<int64_t> exchange_counts(const std::vector<int64_t>& send, int block) = 0;
  virtual void all_reduce(at::Tensor& t, ReduceOp op) = 0;  // in place
  virtual void broadcast(at::Tensor& t, int root) = 0;       // in place
  virtual at::Tensor all_gather(const at::Tensor& t) = 0;    // returns [size(), ...t.sizes()]
  virtual void send(const at::Tensor& t, int dst, int tag) = 0;
  virtual void recv(at::Tensor& t, int src, int tag) = 0;    // t preallocated with the right shape
  virtual void barrier() = 0;
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
  std::vector<int64_t> exchange_counts(const std::vector<int64_t>& send, int block) override;
  void all_reduce(at::Tensor& t, ReduceOp op) override;
  void broadcast(at::Tensor& t, int root) override;
  at::Tensor all_gather(const at::Tensor& t) override;
  void send(const at::Tensor& t, int dst, int tag) override;
  void recv(at::Tensor& t, int src, int tag) override;
  void barrier() override;

 private:
  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
};

// Checks split vectors against the communicator size and the tensor's rows.
void check_splits(const Communicator& comm, const at::Tensor& send, const std::vector<int64_t>& send_splits,
                  const std::vector<int64_t>& recv_splits);

}  // namespace moeprune
