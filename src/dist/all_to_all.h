// All-to-all-v as an autograd function: the backward pass sends each gradient row
// back to the rank its input row came from (the reverse all-to-all).
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "dist/communicator.h"

namespace moeprune {

// x: [sum(send_splits), ...] rows grouped by destination rank;
// returns [sum(recv_splits), ...] rows grouped by source rank, differentiable in x.
at::Tensor all_to_all_autograd(const at::Tensor& x, const std::vector<int64_t>& send_splits,
                               const std::vector<int64_t>& recv_splits, Communicator& comm);

// Communicator::all_to_all_blocks, differentiable in x: the backward exchange swaps
// the send and receive blocks.
at::Tensor all_to_all_blocks_autograd(const at::Tensor& x, const std::vector<RowBlock>& send_blocks,
                                      int64_t recv_rows, const std::vector<RowBlock>& recv_blocks,
                                      Communicator& comm);

}  // namespace moeprune
