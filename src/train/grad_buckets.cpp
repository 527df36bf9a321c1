#include "train/grad_buckets.h"

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <chrono>

namespace moeprune {
namespace {

struct AfterAccumulate final : torch::autograd::PostAccumulateGradHook {
  AfterAccumulate(GradBuckets* b, size_t slot) : buckets(b), slot(slot) {}
  void operator()(const torch::autograd::Variable& /*tensor*/) override { buckets->on_gradient(slot); }
  GradBuckets* buckets;
  size_t slot;
};

}  // namespace

GradBuckets::GradBuckets(std::vector<ParamSlot>& slots, Communicator& comm, int64_t bucket_bytes)
    : slots_(&slots), comm_(&comm), bucket_of_(slots.size(), -1), slot_pos_(slots.size(), -1),
      seen_(slots.size(), false) {
  // Reverse parameter order: roughly the order backward finishes them.
  Bucket cur;
  auto close = [&] {
    if (cur.slots.empty()) return;
    cur.flat = at::empty({cur.offset.back() + slots[cur.slots.back()].param.numel()},
                         slots[cur.slots.front()].param.options());
    buckets_.push_back(std::move(cur));
    cur = Bucket{};
  };
  for (size_t i = slots.size(); i-- > 0;) {
    const ParamSlot& s = slots[i];
    if (s.expert || !s.param.requires_grad()) continue;
    if (!cur.slots.empty() && s.param.scalar_type() != slots[cur.slots.front()].param.scalar_type()) close();
    const int64_t off = cur.slots.empty() ? 0 : cur.offset.back() + slots[cur.slots.back()].param.numel();
    bucket_of_[i] = static_cast<int>(buckets_.size());
    slot_pos_[i] = static_cast<int>(cur.slots.size());
    cur.slots.push_back(i);
    cur.offset.push_back(off);
    if ((off + s.param.numel()) * static_cast<int64_t>(s.param.element_size()) >= bucket_bytes) close();
  }
  close();
  for (size_t i = 0; i < slots.size(); ++i)
    if (bucket_of_[i] >= 0)
      torch::autograd::impl::set_post_acc_grad_hooks(slots[i].param, std::make_unique<AfterAccumulate>(this, i));
  reset();
}

GradBuckets::~GradBuckets() {
  for (size_t i = 0; i < slots_->size(); ++i)
    if (bucket_of_[i] >= 0) torch::autograd::impl::set_post_acc_grad_hooks((*slots_)[i].param, nullptr);
  for (auto& b : buckets_)
    if (b.op) b.op->wait();
}

void GradBuckets::reset() {
  for (auto& b : buckets_) {
    b.pending = static_cast<int>(b.slots.size());
    b.op.reset();
  }
  std::fill(seen_.begin(), seen_.end(), false);
  next_ = 0;
  armed_ = false;
}

void GradBuckets::arm() {
  reset();
  armed_ = true;
  started_early_ = 0;
}

void GradBuckets::on_gradient(size_t slot) {
  if (!armed_ || bucket_of_[slot] < 0) return;
  if (seen_[slot]) return;  // AccumulateGrad runs once per parameter and backward
  fill(slot);
  const size_t before = next_;
  start_ready();
  started_early_ += static_cast<int>(next_ - before);
}

void GradBuckets::fill(size_t slot) {
  Bucket& b = buckets_[static_cast<size_t>(bucket_of_[slot])];
  const at::Tensor& p = (*slots_)[slot].param;
  at::NoGradGuard ng;
  b.flat.narrow(0, b.offset[static_cast<size_t>(slot_pos_[slot])], p.numel()).copy_(p.grad().reshape({-1}));
  seen_[slot] = true;
  --b.pending;
}

void GradBuckets::start_ready() {
  while (next_ < buckets_.size() && buckets_[next_].pending == 0) {
    Bucket& b = buckets_[next_++];
    b.op = comm_->all_reduce_start(b.flat, ReduceOp::Sum);
  }
}

double GradBuckets::finish() {
  const auto t0 = std::chrono::steady_clock::now();
  at::NoGradGuard ng;
  // Parameters that got no gradient in this backward (unused this step) count as zero.
  for (size_t i = 0; i < slots_->size(); ++i) {
    if (bucket_of_[i] < 0 || seen_[i]) continue;
    ParamSlot& s = (*slots_)[i];
    if (!s.param.grad().defined()) s.param.mutable_grad() = at::zeros_like(s.param);
    fill(i);
  }
  start_ready();
  for (auto& b : buckets_) {
    b.op->wait();
    for (size_t j = 0; j < b.slots.size(); ++j) {
      ParamSlot& s = (*slots_)[b.slots[j]];
      s.param.mutable_grad().copy_(b.flat.narrow(0, b.offset[j], s.param.numel()).view_as(s.param));
    }
  }
  reset();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace moeprune
