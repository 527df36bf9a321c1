#include "model/fused_dispatch.h"

#include <ATen/Parallel.h>
#include <torch/autograd.h>

#include <map>
#include <mutex>

#include "core/error.h"
#include "core/log.h"
#include "kernels/dispatch_ops.h"

#ifdef MOEPRUNE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/dispatch_kernels.h"
#endif

namespace moeprune {
namespace k = kernels;

namespace {
void* stream_of(const at::Tensor& t) {
#ifdef MOEPRUNE_WITH_CUDA
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
#else
  (void)t;
  return nullptr;
#endif
}

[[maybe_unused]] void require_cuda_build(const char* what) {
  if (!cuda_kernels_built())
    throw std::runtime_error(concat(what, ": CUDA tensor given but this moeprune was built without the CUDA path"));
}

// For loops over [0, n): the host path of a kernel's grid, in parallel.
template <typename F>
void host_for(int64_t n, int64_t grain, const F& f) {
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(i);
  });
}

// Calls f(in, out) with the data pointers typed as the kernels' float or bf16.
template <typename F>
void with_typed_rows(const at::Tensor& in, at::Tensor& out, const F& f) {
  if (in.scalar_type() == at::kFloat) f(in.data_ptr<float>(), out.data_ptr<float>());
  else f(reinterpret_cast<const k::bf16*>(in.data_ptr()), reinterpret_cast<k::bf16*>(out.data_ptr()));
}

#ifdef MOEPRUNE_WITH_CUDA
k::DType kernel_dtype(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? k::DType::f32 : k::DType::bf16; }
#endif

void check_rows(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 2, what, ": expected a [rows, H] tensor, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, what,
              ": float32 or bfloat16 expected, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), what, ": tensor must be contiguous");
}
}  // namespace

bool cuda_kernels_built() {
#ifdef MOEPRUNE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

namespace {
// Whether the kernels have code for the tensor's GPU (built for another
// architecture: the PyTorch-op path, with one warning per device).
bool runnable_on(const at::Tensor& t) {
#ifdef MOEPRUNE_WITH_CUDA
  static std::mutex mu;
  static std::map<int, bool> known;
  const int dev = t.device().index() < 0 ? 0 : t.device().index();
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(dev);
  if (it != known.end()) return it->second;
  const char* why = "";
  const bool ok = k::kernels_runnable(dev, &why);
  if (!ok)
    log::warn(concat("dispatcher kernels cannot run on cuda:", dev, " (", why,
                     "); using the PyTorch-op path. Rebuild with -DCMAKE_CUDA_ARCHITECTURES naming this GPU's "
                     "architecture (default 90, Hopper)."));
  known[dev] = ok;
  return ok;
#else
  (void)t;
  return false;
#endif
}
}  // namespace

bool cuda_kernels_runnable(int device) {
  return cuda_kernels_built() && runnable_on(at::empty({0}, at::TensorOptions().device(at::kCUDA, device)));
}

std::pair<at::Tensor, at::Tensor> fused_topk(const at::Tensor& probs_in, int K) {
  TORCH_CHECK(probs_in.scalar_type() == at::kFloat, "fused_topk: float32 probabilities expected");
  const int64_t E = probs_in.size(-1);
  TORCH_CHECK(K >= 1 && K <= k::kMaxTopK && K <= E, "fused_topk: k=", K, " outside [1, min(", k::kMaxTopK,
              ", E=", E, ")]");
  at::Tensor probs = probs_in.detach().contiguous();
  const int64_t N = probs.numel() / E;
  auto sizes = probs.sizes().vec();
  sizes.back() = K;
  at::Tensor expert = at::empty(sizes, probs.options().dtype(at::kLong));
  at::Tensor gate = at::empty(sizes, probs.options());
  if (probs.is_cuda()) {
#ifdef MOEPRUNE_WITH_CUDA
    c10::cuda::CUDAGuard guard(probs.device());
    k::launch_topk(probs.data_ptr<float>(), N, static_cast<int>(E), K, expert.data_ptr<int64_t>(),
                   gate.data_ptr<float>(), stream_of(probs));
#else
    require_cuda_build("fused_topk");
#endif
  } else {
    const float* p = probs.data_ptr<float>();
    int64_t* ex = expert.data_ptr<int64_t>();
    float* ga = gate.data_ptr<float>();
    host_for(N, 256, [&](int64_t n) { k::topk_row(p + n * E, static_cast<int>(E), K, ex + n * K, ga + n * K); });
  }
  return {expert, gate};
}

std::pair<at::Tensor, at::Tensor> fused_assign_slots(const at::Tensor& top_expert, const at::Tensor& order,
                                                     int num_experts, int64_t capacity,
                                                     const at::Tensor& token_valid) {
  TORCH_CHECK(top_expert.dim() == 3 && order.dim() == 2, "fused_assign_slots: expert [G,S,K] and order [G,S]");
  at::Tensor ex = top_expert.contiguous().to(at::kLong);
  at::Tensor ord = order.contiguous().to(at::kLong);
  const int64_t G = ex.size(0), S = ex.size(1), K = ex.size(2);
  at::Tensor valid = token_valid.defined() ? token_valid.contiguous().to(at::kBool) : at::Tensor();
  TORCH_CHECK(!valid.defined() || (valid.size(0) == G && valid.size(1) == S), "fused_assign_slots: token_valid must be [G, S]");
  TORCH_CHECK(ord.device() == ex.device() && (!valid.defined() || valid.device() == ex.device()),
              "fused_assign_slots: order and token_valid must be on ", ex.device());
  // Tokens the kernel skips (invalid) keep these values.
  at::Tensor position = at::full(ex.sizes(), -1, ex.options());
  at::Tensor keep = at::zeros(ex.sizes(), ex.options().dtype(at::kBool));
  k::SlotArgs a{};
  a.S = S;
  a.K = K;
  a.E = num_experts;
  a.capacity = capacity;
  a.chunks = k::slot_chunks(S, K);
  at::Tensor counts = at::empty({G, num_experts, a.chunks}, ex.options());
  a.expert = ex.data_ptr<int64_t>();
  a.order = ord.data_ptr<int64_t>();
  a.valid = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  a.counts = counts.data_ptr<int64_t>();
  a.position = position.data_ptr<int64_t>();
  a.keep = keep.data_ptr<bool>();
  if (ex.is_cuda()) {
#ifdef MOEPRUNE_WITH_CUDA
    c10::cuda::CUDAGuard guard(ex.device());
    k::launch_assign_slots(a, G, stream_of(ex));
#else
    require_cuda_build("fused_assign_slots");
#endif
  } else {
    // The two passes of the kernel, each over its whole (g, e, c) grid.
    const int64_t total = G * a.E * a.chunks;
    host_for(total, 64, [&](int64_t t) {
      int64_t g, e, c;
      k::slot_thread(a, t, g, e, c);
      k::slot_count(a, g, e, c);
    });
    host_for(total, 64, [&](int64_t t) {
      int64_t g, e, c;
      k::slot_thread(a, t, g, e, c);
      k::slot_assign(a, g, e, c);
    });
  }
  return {position, keep};
}

at::Tensor permute_rows(const at::Tensor& x, const at::Tensor& index_in, const at::Tensor& scale_in) {
  check_rows(x, "permute_rows");
  const int64_t A = index_in.numel(), H = x.size(1);
  at::Tensor index = index_in.contiguous().to(at::kLong);
  at::Tensor scale = scale_in.defined() ? scale_in.detach().contiguous().to(at::kFloat) : at::Tensor();
  TORCH_CHECK(index.device() == x.device() && (!scale.defined() || scale.device() == x.device()),
              "permute_rows: index and scale must be on ", x.device(), " like x");
  TORCH_CHECK(!scale.defined() || scale.numel() == A, "permute_rows: ", scale.numel(), " scales for ", A, " rows");
  at::Tensor out = at::empty({A, H}, x.options());
  const float* sp = scale.defined() ? scale.data_ptr<float>() : nullptr;
  const int64_t* ip = index.data_ptr<int64_t>();
  if (x.is_cuda()) {
#ifdef MOEPRUNE_WITH_CUDA
    c10::cuda::CUDAGuard guard(x.device());
    k::launch_permute(kernel_dtype(x), x.data_ptr(), ip, sp, out.data_ptr(), A, H, stream_of(x));
#else
    require_cuda_build("permute_rows");
#endif
    return out;
  }
  with_typed_rows(x, out, [&](auto* xp, auto* op) {
    host_for(A, 16, [&](int64_t a) { k::permute_span(xp, ip, sp, op, H, a, 0, H); });
  });
  return out;
}

at::Tensor combine_rows(const at::Tensor& y, const at::Tensor& row_of_in, const at::Tensor& weight_in) {
  check_rows(y, "combine_rows");
  TORCH_CHECK(row_of_in.dim() == 2, "combine_rows: row_of must be [N, K]");
  const int64_t N = row_of_in.size(0), K = row_of_in.size(1), H = y.size(1);
  at::Tensor row_of = row_of_in.contiguous().to(at::kLong);
  at::Tensor weight = weight_in.defined() ? weight_in.detach().contiguous().to(at::kFloat) : at::Tensor();
  TORCH_CHECK(row_of.device() == y.device() && (!weight.defined() || weight.device() == y.device()),
              "combine_rows: row_of and weight must be on ", y.device(), " like y");
  TORCH_CHECK(!weight.defined() || weight.numel() == N * K, "combine_rows: ", weight.numel(), " weights for [", N,
              ", ", K, "] choices");
  at::Tensor out = at::empty({N, H}, y.options());
  const float* wp = weight.defined() ? weight.data_ptr<float>() : nullptr;
  const int64_t* rp = row_of.data_ptr<int64_t>();
  if (y.is_cuda()) {
#ifdef MOEPRUNE_WITH_CUDA
    c10::cuda::CUDAGuard guard(y.device());
    k::launch_combine(kernel_dtype(y), y.data_ptr(), rp, wp, out.data_ptr(), N, K, H, stream_of(y));
#else
    require_cuda_build("combine_rows");
#endif
    return out;
  }
  with_typed_rows(y, out, [&](auto* yp, auto* op) {
    at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
      std::vector<float> acc(static_cast<size_t>(H));  // one row of scratch per worker
      for (int64_t n = b; n < e; ++n) k::combine_span(yp, rp, wp, op, acc.data(), K, H, n, 0, H);
    });
  });
  return out;
}

at::Tensor inverse_rows(const at::Tensor& slot, int64_t N, int64_t K) {
  at::Tensor row_of = at::full({N * K}, -1, slot.options().dtype(at::kLong));
  row_of.index_put_({slot.to(at::kLong)}, at::arange(slot.numel(), row_of.options()));
  return row_of.view({N, K});
}

namespace {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct PermuteFn : public torch::autograd::Function<PermuteFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& index,
                            const at::Tensor& row_of) {
    ctx->save_for_backward({row_of});
    return permute_rows(x.contiguous(), index);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    const at::Tensor row_of = ctx->get_saved_variables()[0];
    return {combine_rows(g[0].contiguous(), row_of), at::Tensor(), at::Tensor()};
  }
};

struct CombineFn : public torch::autograd::Function<CombineFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& gate,
                            const at::Tensor& token, const at::Tensor& row_of) {
    at::Tensor yc = y.contiguous();
    at::Tensor g = gate.detach().contiguous().to(at::kFloat);
    // Each token's weights in its row_of order (0 where a choice was dropped; all
    // of them when nothing was kept on this rank, e.g. an all-padding batch).
    at::Tensor weight = at::zeros(row_of.sizes(), g.options());
    if (g.numel() > 0) {
      at::Tensor valid = row_of >= 0;
      weight = at::where(valid, g.index_select(0, row_of.clamp_min(0).reshape({-1})).view_as(row_of), weight);
    }
    ctx->save_for_backward({yc, g, token});
    return combine_rows(yc, row_of, weight);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &y = saved[0], &g = saved[1], &token = saved[2];
    at::Tensor go = grads[0].contiguous().to(y.scalar_type());
    at::Tensor dy = permute_rows(go, token, g);
    at::Tensor dgate;
    if (ctx->needs_input_grad(1)) dgate = (permute_rows(go, token).to(at::kFloat) * y.to(at::kFloat)).sum(1);
    return {dy, dgate, at::Tensor(), at::Tensor()};
  }
};
}  // namespace

at::Tensor permute_rows_autograd(const at::Tensor& x, const at::Tensor& index, const at::Tensor& row_of) {
  return PermuteFn::apply(x, index, row_of);
}

at::Tensor combine_autograd(const at::Tensor& y, const at::Tensor& gate, const at::Tensor& token,
                            const at::Tensor& row_of) {
  return CombineFn::apply(y, gate, token, row_of);
}

}  // namespace moeprune
