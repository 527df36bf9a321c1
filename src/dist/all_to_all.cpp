#include "dist/all_to_all.h"

#include <torch/autograd.h>

namespace moeprune {
namespace {

struct AllToAllFn : public torch::autograd::Function<AllToAllFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const std::vector<int64_t>& send_splits, const std::vector<int64_t>& recv_splits,
                            Communicator* comm) {
    ctx->saved_data["send"] = send_splits;
    ctx->saved_data["recv"] = recv_splits;
    // The communicator outlives every graph built with it (it belongs to World or
    // to the test); autograd's saved_data only stores IValues, hence the integer.
    ctx->saved_data["comm"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(comm));
    return comm->all_to_all(x, send_splits, recv_splits);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* comm = reinterpret_cast<Communicator*>(static_cast<intptr_t>(ctx->saved_data["comm"].toInt()));
    const auto send = ctx->saved_data["send"].toIntVector();
    const auto recv = ctx->saved_data["recv"].toIntVector();
    // Every rank must take part in the reverse exchange, also when its output
    // did not reach the loss (then its gradient rows are zero).
    at::Tensor g = comm->all_to_all(grads[0].contiguous(), recv, send);
    return {g, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::vector<int64_t> flatten(const std::vector<RowBlock>& blocks) {
  std::vector<int64_t> v;
  v.reserve(blocks.size() * 3);
  for (const RowBlock& b : blocks) {
    v.push_back(b.peer);
    v.push_back(b.offset);
    v.push_back(b.rows);
  }
  return v;
}

std::vector<RowBlock> unflatten(const std::vector<int64_t>& v) {
  std::vector<RowBlock> blocks(v.size() / 3);
  for (size_t i = 0; i < blocks.size(); ++i)
    blocks[i] = RowBlock{static_cast<int>(v[3 * i]), v[3 * i + 1], v[3 * i + 2]};
  return blocks;
}

struct AllToAllBlocksFn : public torch::autograd::Function<AllToAllBlocksFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const std::vector<RowBlock>& send_blocks, int64_t recv_rows,
                            const std::vector<RowBlock>& recv_blocks, Communicator* comm) {
    ctx->saved_data["send"] = flatten(send_blocks);
    ctx->saved_data["recv"] = flatten(recv_blocks);
    ctx->saved_data["rows"] = x.size(0);
    ctx->saved_data["comm"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(comm));
    return comm->all_to_all_blocks(x, send_blocks, recv_rows, recv_blocks);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* comm = reinterpret_cast<Communicator*>(static_cast<intptr_t>(ctx->saved_data["comm"].toInt()));
    const auto send = unflatten(ctx->saved_data["send"].toIntVector());
    const auto recv = unflatten(ctx->saved_data["recv"].toIntVector());
    at::Tensor g = comm->all_to_all_blocks(grads[0].contiguous(), recv, ctx->saved_data["rows"].toInt(), send);
    return {g, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor all_to_all_blocks_autograd(const at::Tensor& x, const std::vector<RowBlock>& send_blocks,
                                      int64_t recv_rows, const std::vector<RowBlock>& recv_blocks,
                                      Communicator& comm) {
  return AllToAllBlocksFn::apply(x, send_blocks, recv_rows, recv_blocks, &comm);
}

at::Tensor all_to_all_autograd(const at::Tensor& x, const std::vector<int64_t>& send_splits,
                               const std::vector<int64_t>& recv_splits, Communicator& comm) {
  return AllToAllFn::apply(x, send_splits, recv_splits, &comm);
}

}  // namespace moeprune
