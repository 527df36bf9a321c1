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

}  // namespace

at::Tensor all_to_all_autograd(const at::Tensor& x, const std::vector<int64_t>& send_splits,
                               const std::vector<int64_t>& recv_splits, Communicator& comm) {
  return AllToAllFn::apply(x, send_splits, recv_splits, &comm);
}

}  // namespace moeprune
