// The kernels backend of TokenDispatcher (model/dispatcher.h): top-k and capacity
// slots by the kernels' two-pass assignment, permute and unpermute + combine by
// the fused operations of model/fused_dispatch.h (CUDA grids on GPUs, the same
// element functions in host loops on CPUs). On CPUs, dispatch and combine move
// the rows by the direct exchange (model/direct_exchange.h) instead: the rank's
// own rows never pass through an exchange buffer.
#include "model/dispatcher.h"
#include "model/direct_exchange.h"
#include "model/fused_dispatch.h"
#include "dist/node_memory.h"

namespace moeprune {
namespace {

// The kernels' plan: where each token's choices sit in send order.
struct KernelPlan final : DispatchPlan {
  at::Tensor send_row_of;  // [N, k] int64: send row of choice j of token n, -1 if dropped
};

const KernelPlan& kernel_plan(const DispatchPlan& p) {
  const auto* kp = dynamic_cast<const KernelPlan*>(&p);
  TORCH_CHECK(kp != nullptr, "kernel dispatcher: the plan was made by another backend");
  return *kp;
}

}  // namespace

Selection KernelDispatcher::select(const at::Tensor& probs, int k, int64_t capacity, bool bpr,
                                   const at::Tensor& token_valid) const {
  Selection s;
  s.expert = fused_topk(probs, k).first;
  s.gate = probs.gather(-1, s.expert);  // gathered so that gates stay differentiable
  std::tie(s.position, s.keep) = fused_assign_slots(s.expert, priority_order(s.gate, bpr, token_valid),
                                                    static_cast<int>(probs.size(-1)), capacity, token_valid);
  return s;
}

std::unique_ptr<DispatchPlan> KernelDispatcher::plan(const RoutedChoices& c) const {
  auto p = std::make_unique<KernelPlan>();
  fill_plan(c, *p);
  if (!c.expert.is_cpu())  // the direct exchange of the CPU path needs no inverse
    p->send_row_of = inverse_rows(p->choice, p->num_tokens, c.expert.size(1));
  return p;
}

at::Tensor KernelDispatcher::dispatch(const at::Tensor& x, const DispatchPlan& p) const {
  if (x.is_cpu()) return direct_dispatch(x, p, *comm_);
  return send(permute_rows_autograd(x, p.token, kernel_plan(p).send_row_of), p);
}

at::Tensor KernelDispatcher::combine(const at::Tensor& y, const DispatchPlan& p) const {
  if (y.is_cpu()) return direct_combine(y, p, *comm_);
  return combine_autograd(send_back(y, p), p.gate, p.token, kernel_plan(p).send_row_of);
}

std::function<at::Tensor(int64_t, int64_t, const at::TensorOptions&)> KernelDispatcher::output_alloc(
    const at::Tensor& rows) const {
  if (!rows.is_cpu()) return {};
  std::shared_ptr<NodeMemory> m = comm_->node_memory();
  if (!m) return {};
  return [m](int64_t n, int64_t cols, const at::TensorOptions& o) {
    at::Tensor t = node_empty(m, {n, cols}, o);
    return t.defined() ? t : at::empty({n, cols}, o);  // no room left: the combine moves these rows by MPI
  };
}

}  // namespace moeprune
