// Dense-gradient reduction that overlaps backward (the scheme of PyTorch DDP): the
// dense parameters are grouped into buckets of about `bucket_bytes` in reverse
// order (the order backward produces their gradients); a hook after each
// parameter's gradient accumulation copies it into its bucket, and a full bucket is
// all-reduced at once (MPI_Iallreduce; NCCL on a side stream) while backward goes on.
// Buckets start strictly in bucket order, so every rank issues the same collectives
// in the same order whatever order its hooks fire in. finish() starts what is left
// (parameters that got no gradient count as zero), waits, and writes the sums back.
//
// Only the backward after arm() reduces: with gradient accumulation, the last
// micro-batch's. The sums equal the flat all-reduce's up to float reduction order.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "dist/communicator.h"
#include "train/optimizer.h"

namespace moeprune {

class GradBuckets {
 public:
  // slots: the optimiser's; the dense ones are reduced over comm. Installs hooks on
  // their parameters (removed by the destructor). slots must outlive this object.
  GradBuckets(std::vector<ParamSlot>& slots, Communicator& comm, int64_t bucket_bytes);
  ~GradBuckets();
  GradBuckets(const GradBuckets&) = delete;
  GradBuckets& operator=(const GradBuckets&) = delete;

  // The next backward's accumulated gradients are final: reduce them as they come.
  void arm();
  // Starts the buckets not started yet, waits for all of them and writes the sums
  // into the gradients. Returns the seconds spent here (the part of the reduction
  // backward did not hide; on GPUs the host time to queue the waits).
  double finish();
  size_t size() const { return buckets_.size(); }
  // Buckets that started during the last backward (before finish()).
  int started_in_backward() const { return started_early_; }

  // Called by the hook of dense slot `slot` (an index into slots).
  void on_gradient(size_t slot);

 private:
  struct Bucket {
    std::vector<size_t> slots;    // indices into slots_
    std::vector<int64_t> offset;  // element offset of each in flat
    at::Tensor flat;
    int pending = 0;
    std::unique_ptr<PendingCollective> op;
  };
  // Copies slot's gradient into its bucket and counts it in.
  void fill(size_t slot);
  void start_ready();
  void reset();

  std::vector<ParamSlot>* slots_;
  Communicator* comm_;
  std::vector<Bucket> buckets_;
  std::vector<int> bucket_of_;  // slot -> bucket (-1: not dense)
  std::vector<int> slot_pos_;   // slot -> position inside its bucket
  std::vector<bool> seen_;      // slot's gradient copied this round
  size_t next_ = 0;             // next bucket to start
  bool armed_ = false;
  int started_early_ = 0;
};

}  // namespace moeprune
