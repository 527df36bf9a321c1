#include "model/expert_bank.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>

#include <algorithm>
#include <cmath>

#include "core/seed.h"

namespace moeprune {

uint64_t expert_seed(uint64_t seed, int layer, int expert_id) {
  return mix_seed(seed, static_cast<uint64_t>(layer + 1), static_cast<uint64_t>(expert_id + 1));
}

ExpertBankImpl::ExpertBankImpl(int hidden, int mlp_dim, std::vector<int> expert_ids, int layer, uint64_t seed,
                               ExpertGemm gemm)
    : expert_ids_(std::move(expert_ids)), gemm_(gemm) {
  const int64_t n = num_local();
  at::Tensor W1 = at::empty({n, hidden, mlp_dim}), W2 = at::empty({n, mlp_dim, hidden});
  const double bound = std::sqrt(6.0 / (hidden + mlp_dim));  // Xavier uniform, as the ViT MLP
  for (int64_t i = 0; i < n; ++i) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(expert_seed(seed, layer, expert_ids_[i]));
    W1[i].uniform_(-bound, bound, gen);
    W2[i].uniform_(-bound, bound, gen);
  }
  w1 = register_parameter("w1", W1);
  b1 = register_parameter("b1", at::zeros({n, mlp_dim}));
  w2 = register_parameter("w2", W2);
  b2 = register_parameter("b2", at::zeros({n, hidden}));
}

at::Tensor ExpertBankImpl::forward(const at::Tensor& x, const std::vector<int64_t>& counts) {
  TORCH_CHECK(static_cast<int>(counts.size()) == num_local(), "expert bank: ", counts.size(), " counts for ",
              num_local(), " experts");
  ExpertGemm g = gemm_;
  if (g == ExpertGemm::Auto) {
    // GPUs: one grouped GEMM per side beats a GEMM pair per expert at every measured
    // shape (docs/performance.md, H200). CPUs: a GEMM pair per expert. Batched is
    // faster for tiny experts (tiny default: 1.2-1.6x fp32, 1.6-2.4x bf16 steps; level
    // at 128 x 512, behind at 768 x 3072 in fp32) but pads a rank's experts to their
    // largest count, so an expert's rounding depends on which experts share its rank
    // and re-placing survivors after pruning would no longer be bit-identical
    // (PruneMpi.PlacementInvarianceAndSingleProcessOracle failed with it): opt-in.
    g = x.is_cuda() ? ExpertGemm::Grouped : ExpertGemm::Loop;
  }
  if (x.size(0) > 0 && g == ExpertGemm::Grouped) return forward_grouped(x, counts);
  if (x.size(0) > 0 && g == ExpertGemm::Batched) return forward_batched(x, counts);
  return forward_loop(x, counts);
}

at::Tensor ExpertBankImpl::forward_grouped(const at::Tensor& x, const std::vector<int64_t>& counts) {
  // One grouped GEMM per side; offsets are the end row of each local expert.
  // Through pinned memory, without waiting: a pageable copy would stall the stream.
  at::Tensor host = at::empty({static_cast<int64_t>(counts.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(x.is_cuda()));
  std::copy(counts.begin(), counts.end(), host.data_ptr<int64_t>());
  at::Tensor n = host.to(x.device(), /*non_blocking=*/true);
  at::Tensor offs = n.cumsum(0).to(at::kInt);
  at::Tensor W1 = w1, B1 = b1, W2 = w2, B2 = b2, xin = x;
  const auto dev = x.device().type();
  if (at::autocast::is_autocast_enabled(dev)) {  // _grouped_mm has no autocast rule: cast here
    const auto dt = at::autocast::get_autocast_dtype(dev);
    W1 = w1.to(dt), B1 = b1.to(dt), W2 = w2.to(dt), B2 = b2.to(dt), xin = x.to(dt);
  }
  // Biases through a one-hot [rows, E] matrix: the forward copies each expert's bias
  // to its rows exactly, and the backward sums the rows of each expert in one GEMM
  // (repeat_interleave's backward is an index_add whose atomics all hit E rows:
  // 1.2 ms of 4.8 at 16k tokens, hidden 768, on an H200).
  at::Tensor onehot = at::one_hot(at::arange(n.size(0), n.options()).repeat_interleave(n, 0, x.size(0)), n.size(0))
                          .to(xin.scalar_type());
  at::Tensor h = at::gelu(at::_grouped_mm(xin, W1, offs) + at::mm(onehot, B1), "tanh");
  return at::_grouped_mm(h, W2, offs) + at::mm(onehot, B2);
}

namespace {
// Whether x's expert GEMMs run in bf16 on a CPU (oneDNN).
bool cpu_bf16(const at::Tensor& x) {
  const auto dev = x.device().type();
  return x.is_cpu() && (x.scalar_type() == at::kBFloat16 || (at::autocast::is_autocast_enabled(dev) &&
                                                             at::autocast::get_autocast_dtype(dev) == at::kBFloat16));
}

// Rows an expert GEMM is padded to on the bf16 CPU path: n rounded up to one of 8
// sizes per octave (16 at least).
int64_t padded_rows(int64_t n) {
  if (n <= 16) return 16;
  int64_t octave = 1;
  while (octave * 2 <= n) octave *= 2;
  const int64_t step = std::max<int64_t>(16, octave / 8);
  return (n + step - 1) / step * step;
}
}  // namespace

at::Tensor ExpertBankImpl::forward_batched(const at::Tensor& x, const std::vector<int64_t>& counts) {
  // Every expert padded to the largest count C (the bf16 CPU path: C as padded_rows,
  // see forward_loop): one [E, C, hidden] x [E, hidden, mlp] product per side, no
  // per-expert autograd nodes, the weight gradients computed stacked. Padded rows are
  // zeros: their outputs are dropped and they add nothing to any gradient.
  const int64_t E = num_local(), H = x.size(1);
  int64_t C = *std::max_element(counts.begin(), counts.end());
  if (cpu_bf16(x)) C = padded_rows(C);
  std::vector<int64_t> dest;
  dest.reserve(static_cast<size_t>(x.size(0)));
  for (int64_t i = 0; i < E; ++i)
    for (int64_t j = 0; j < counts[static_cast<size_t>(i)]; ++j) dest.push_back(i * C + j);
  const at::Tensor idx = at::tensor(dest, at::kLong).to(x.device());
  const at::Tensor xp = at::zeros({E * C, H}, x.options()).index_copy(0, idx, x).view({E, C, H});
  const at::Tensor h = at::gelu(at::baddbmm(b1.unsqueeze(1), xp, w1), "tanh");
  return at::baddbmm(b2.unsqueeze(1), h, w2).view({E * C, H}).index_select(0, idx);
}

at::Tensor ExpertBankImpl::forward_loop(const at::Tensor& x, const std::vector<int64_t>& counts) {
  std::vector<at::Tensor> outs;
  outs.reserve(counts.size());
  // bf16 products on CPUs go to oneDNN, which generates a kernel for every new
  // shape (~0.6 ms each on a Xeon with AMX, against ~0.04 ms for the product
  // itself at the tiny default's sizes) and keeps 1024 of them: expert row counts
  // change every step, so nearly every expert GEMM paid for a new kernel. Rows are
  // padded with zeros to one of 8 sizes per octave (< 12.5% more rows), which
  // bounds the shapes; zero rows add nothing to any gradient, and the padded rows'
  // outputs are dropped.
  const bool pad = cpu_bf16(x);
  // unbind once: its backward stacks the experts' gradients into one tensor, where
  // indexing each expert (w1[i]) would materialise a full-size gradient per expert.
  const auto W1 = w1.unbind(0), B1 = b1.unbind(0), W2 = w2.unbind(0), B2 = b2.unbind(0);
  // One split, not a narrow per expert: each narrow's backward writes a zero-filled
  // gradient of all of x (E full-size fills and adds); the split's backward is one cat.
  const auto xs = x.split_with_sizes(counts, 0);
  for (int i = 0; i < num_local(); ++i) {
    if (counts[i] == 0) continue;
    const int64_t rows = pad ? padded_rows(counts[i]) : counts[i];
    const at::Tensor xi = rows == counts[i] ? xs[i] : at::constant_pad_nd(xs[i], {0, 0, 0, rows - counts[i]});
    at::Tensor h = at::gelu(at::addmm(B1[i], xi, W1[i]), "tanh");
    at::Tensor y = at::addmm(B2[i], h, W2[i]);
    outs.push_back(rows == counts[i] ? y : y.narrow(0, 0, counts[i]));
  }
  if (outs.empty()) return x.narrow(0, 0, 0) * 0;  // keeps the graph connected to x
  return outs.size() == 1 ? outs[0] : at::cat(outs, 0);
}

}  // namespace moeprune
