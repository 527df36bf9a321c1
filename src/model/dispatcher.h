// Moves routed tokens to the ranks that hold their experts and brings the expert
// outputs back (the Megatron-Core "token dispatcher" role: permutation and
// all-to-all, nothing else). Knows the Placement, not the experts' internals.
//
// dispatch(): kept choices are sorted into send order (by the rank holding the
// expert, then expert, then group, then capacity slot), counts are exchanged, and
// the payload moves with one block all-to-all (one block per (rank, expert)) that
// writes each local expert's rows contiguously on arrival: no regrouping pass.
// combine() sends the expert outputs back the same way and sums them weighted by
// their gates in the original token order.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "dist/communicator.h"
#include "model/placement.h"

namespace moeprune {

struct DispatchPlan {
  // Send side (this rank's tokens).
  at::Tensor token;        // [A] int64: source token of each kept choice, in send order
  at::Tensor gate;         // [A] float: its gate (differentiable)
  at::Tensor send_expert;  // [A] int64: its expert, in send order
  std::vector<int64_t> send_splits, recv_splits;  // rows per rank
  std::vector<int64_t> send_counts;  // [E] kept choices per expert of the layer (all ranks' experts)
  std::vector<RowBlock> send_blocks;  // one per (destination rank, its local expert), in send order
  // Receive side (rows for this rank's experts), expert-major: (local expert, source rank).
  std::vector<RowBlock> recv_blocks;  // one per (source rank, local expert), in each source's send order
  std::vector<int64_t> expert_counts;  // rows per local expert, local order
  int64_t recv_rows = 0;
  int64_t num_tokens = 0;
  // Fused path (model/fused_dispatch.h), set when use_kernels() holds for the
  // routing tensors: the send row of each token's choices [N, k], -1 if dropped.
  at::Tensor send_row_of;
  bool fused = false;
};

class Dispatcher {
 public:
  Dispatcher(Communicator& comm, const Placement& placement) : comm_(&comm), placement_(&placement) {}

  // Builds the plan and exchanges counts. expert/keep/gate: [N, k]; group/position: [N, k].
  // Sort key inside an expert: (group, position), the order of V-MoE's dispatch buffer.
  DispatchPlan plan(const at::Tensor& expert, const at::Tensor& gate, const at::Tensor& keep,
                    const at::Tensor& group, const at::Tensor& position, int64_t capacity, int64_t num_groups) const;
  // x: [N, H] -> [sum(expert_counts), H] rows grouped by local expert.
  at::Tensor dispatch(const at::Tensor& x, const DispatchPlan& plan) const;
  // y: [sum(expert_counts), H] expert outputs in dispatch() order -> [N, H].
  at::Tensor combine(const at::Tensor& y, const DispatchPlan& plan) const;

 private:
  Communicator* comm_;
  const Placement* placement_;
};

}  // namespace moeprune
