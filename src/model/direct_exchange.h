// Dispatch and combine for host memory that never move a rank's own rows through
// an exchange buffer (the CPU path of KernelDispatcher, model/dispatcher.h).
//
// The PyTorch-op path makes four passes over the payload besides the two
// exchanges: the send-side gather, the exchange's copy of the rows a rank keeps
// for itself, the same copy on the way back, and the weighted combine. Here the
// rows for the rank's own experts are gathered straight from x into their place
// among the received rows, the rows for other ranks leave through MPI indexed
// datatypes over x (no packed copy of ours), and the combine reads the rank's own
// expert outputs where the experts wrote them, while the other ranks' rows are in
// flight. Gradients take the same routes backwards. Same results as the PyTorch
// ops (the MoE-layer oracle runs both backends on 1, 2 and 4 ranks).
#pragma once
#include <ATen/ATen.h>

#include <functional>

#include "dist/communicator.h"
#include "model/dispatcher.h"
#include "model/expert_bank.h"

namespace moeprune {

// x [N, H] -> [plan.recv_rows, H], the rows of dispatch() (differentiable in x).
at::Tensor direct_dispatch(const at::Tensor& x, const DispatchPlan& plan, Communicator& comm);
// y [plan.recv_rows, H] expert outputs in dispatch() order -> [N, H]: out[n] = sum
// over the kept choices a of token n of gate[a] * (expert output of a)
// (differentiable in y and plan.gate).
at::Tensor direct_combine(const at::Tensor& y, const DispatchPlan& plan, Communicator& comm);

// Dispatch, experts and combine with the exchange overlapping the experts
// (runtime.dispatch_chunks = C > 1): the rank's local experts are split into C
// chunks of consecutive experts; every row message of the layer is posted at once
// (one per (peer, expert), tagged by expert), the experts of chunk j compute as
// soon as chunk j's rows are in, and each expert's outputs leave for their source
// ranks as soon as it is done while the next experts compute. Backward the same way
// round: the combine's backward posts the output gradients, each expert's backward
// waits for its chunk's, and each expert's input gradients leave as soon as they
// are computed. The same operations on the same rows as direct_dispatch,
// experts(x) and direct_combine, only in another order: identical results.
// experts(x, hooks) runs the loop of experts over x with the hooks. Needs a
// communicator that posts_blocks() and C <= the largest number of local experts a
// rank holds (pipelines() says whether a plan can).
bool pipelines(const DispatchPlan& plan, const Communicator& comm, int chunks);
at::Tensor pipelined_moe(const at::Tensor& x, const DispatchPlan& plan, Communicator& comm, int chunks,
                         const std::function<at::Tensor(const at::Tensor&, const ExpertHooksPtr&)>& experts);

}  // namespace moeprune
