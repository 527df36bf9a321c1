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

#include "dist/communicator.h"
#include "model/dispatcher.h"

namespace moeprune {

// x [N, H] -> [plan.recv_rows, H], the rows of dispatch() (differentiable in x).
at::Tensor direct_dispatch(const at::Tensor& x, const DispatchPlan& plan, Communicator& comm);
// y [plan.recv_rows, H] expert outputs in dispatch() order -> [N, H]: out[n] = sum
// over the kept choices a of token n of gate[a] * (expert output of a)
// (differentiable in y and plan.gate).
at::Tensor direct_combine(const at::Tensor& y, const DispatchPlan& plan, Communicator& comm);

}  // namespace moeprune
