#include "model/expert_bank.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>

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

ExpertGemm ExpertBankImpl::resolved_gemm(const at::Tensor& x) const {
  if (gemm_ != ExpertGemm::Auto) return gemm_;
  // GPUs: one grouped GEMM per side beats a GEMM pair per expert at every measured
  // shape (docs/performance.md, H200). CPUs: the batched product for small experts in
  // bf16, where oneDNN's per-call cost dominates (tiny default: 1.6-2.0x faster steps
  // on 1 rank, 1.2x on 2); in float32 it was level on 1 rank and 10-20% slower on 2
  // (docs/performance.md, "Experts"), so the loop. A rule on shapes and precision, not
  // a timing: every rank, and every resumed run, must choose alike.
  if (x.is_cuda()) return ExpertGemm::Grouped;
  return cpu_bf16(x) && w1.size(1) * w1.size(2) < 128 * 512 ? ExpertGemm::Batched : ExpertGemm::Loop;
}

at::Tensor ExpertBankImpl::forward(const at::Tensor& x, const std::vector<int64_t>& counts, int64_t rows_bound,
                                   const ExpertHooksPtr& hooks, const RowsAlloc& alloc) {
  TORCH_CHECK(static_cast<int>(counts.size()) == num_local(), "expert bank: ", counts.size(), " counts for ",
              num_local(), " experts");
  const ExpertGemm g = resolved_gemm(x);
  TORCH_CHECK(!hooks || g == ExpertGemm::Loop, "expert bank: hooks need the loop strategy, not ", str(g));
  if (x.size(0) > 0 && g == ExpertGemm::Grouped) return forward_grouped(x, counts);
  if (x.size(0) > 0 && g == ExpertGemm::Batched) return forward_batched(x, counts, rows_bound);
  return forward_loop(x, counts, hooks, alloc);
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
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// f(b) for every expert b of a batch, on the intra-op threads. An ATen op called
// inside runs serially on expert b's slice, so its bits depend on that slice alone:
// ATen's elementwise loops give the last elements of every call, and of every
// thread's chunk, to the scalar function (whose tanh rounds differently from the
// vector one), and reductions split by threads; over the whole padded batch, an
// expert's GELU and bias gradient would depend on where it sits in the batch.
template <class F>
void per_expert(int64_t B, const F& f) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad;
    c10::impl::ExcludeDispatchKeyGuard no_autocast(
        c10::DispatchKeySet({c10::DispatchKey::AutocastCPU, c10::DispatchKey::AutocastCUDA}));
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
}

// [B, F] float32: the row sums of each expert's [C, F] slice of g.
at::Tensor row_sums(const at::Tensor& g) {
  at::Tensor out = at::empty({g.size(0), g.size(2)}, g.options().dtype(at::kFloat));
  per_expert(g.size(0), [&](int64_t b) {
    at::Tensor o = out[b];
    at::sum_out(o, g[b], {0}, false, at::kFloat);
  });
  return out;
}

// y = act(z), z = pre + bias (bias [B, F] broadcast over each expert's rows), act =
// tanh GELU or identity, one expert at a time; the bias gradient is each expert's
// row sum of dz.
struct PerExpertBiasAct : public torch::autograd::Function<PerExpertBiasAct> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& pre, const at::Tensor& bias, bool gelu) {
    const at::Tensor b = bias.to(pre.scalar_type());
    at::Tensor z = at::empty_like(pre, at::MemoryFormat::Contiguous);
    at::Tensor y = gelu ? at::empty_like(z) : z;
    per_expert(pre.size(0), [&](int64_t e) {
      at::Tensor ze = z[e];
      at::add_out(ze, pre[e], b[e]);
      if (!gelu) return;
      at::Tensor ye = y[e];
      at::gelu_out(ye, ze, "tanh");
    });
    ctx->saved_data["gelu"] = gelu;
    ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias.scalar_type());
    if (gelu) ctx->save_for_backward({z});
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor dz = grads[0].contiguous();
    if (ctx->saved_data["gelu"].toBool()) {
      const at::Tensor z = ctx->get_saved_variables()[0];
      at::Tensor d = at::empty_like(z);
      per_expert(z.size(0), [&](int64_t e) {
        at::Tensor de = d[e];
        at::gelu_backward_out(de, dz[e], z[e], "tanh");
      });
      dz = d;
    }
    const auto bias_dtype = static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
    return {dz, row_sums(dz).to(bias_dtype), at::Tensor()};
  }
};
}  // namespace

at::Tensor ExpertBankImpl::forward_batched(const at::Tensor& x, const std::vector<int64_t>& counts,
                                           int64_t rows_bound) {
  // Every expert padded to C rows: one [B, C, hidden] x [B, hidden, mlp] product per
  // side, no per-expert autograd nodes, the weight gradients computed stacked. Padded
  // rows are zeros: their outputs are dropped and they add nothing to any gradient.
  //
  // Placement invariance (re-placing survivors after pruning stays bit-identical,
  // in training too): a batched product computes each batch entry alone (the same
  // bits whichever entries share the batch: checked for fp32 and bf16, 1 and 2
  // threads, outputs and weight gradients), except a batch of one, which goes to a
  // single GEMM that splits the weight gradient's row sum among threads — one expert
  // gets a zero partner; the biases and the GELU run one expert at a time
  // (PerExpertBiasAct); and C is the layer's rows bound, the same under every
  // placement (outputs do not depend on C, float32 weight gradients do: the row sum
  // is blocked by it). Test: Kernels.BatchedExpertsDoNotDependOnTheirNeighbours.
  const int64_t E = num_local(), H = x.size(1);
  const int64_t most = *std::max_element(counts.begin(), counts.end());
  int64_t C = rows_bound >= most ? rows_bound : most;
  C = cpu_bf16(x) ? padded_rows(C) : (C + 15) / 16 * 16;  // whole cache lines per expert
  const int64_t B = std::max<int64_t>(E, 2);
  at::Tensor W1 = w1, B1 = b1, W2 = w2, B2 = b2;
  if (B > E) {
    W1 = at::cat({w1, at::zeros_like(w1)}), B1 = at::cat({b1, at::zeros_like(b1)});
    W2 = at::cat({w2, at::zeros_like(w2)}), B2 = at::cat({b2, at::zeros_like(b2)});
  }
  std::vector<int64_t> dest;
  dest.reserve(static_cast<size_t>(x.size(0)));
  for (int64_t i = 0; i < E; ++i)
    for (int64_t j = 0; j < counts[static_cast<size_t>(i)]; ++j) dest.push_back(i * C + j);
  const at::Tensor idx = at::tensor(dest, at::kLong).to(x.device());
  const at::Tensor xp = at::zeros({B * C, H}, x.options()).index_copy(0, idx, x).view({B, C, H});
  const at::Tensor h = PerExpertBiasAct::apply(at::bmm(xp, W1), B1, true);
  return PerExpertBiasAct::apply(at::bmm(h, W2), B2, false).view({B * C, H}).index_select(0, idx);
}

namespace {
// The loop strategy, one GEMM pair per expert over its rows: out[rows of i] =
// gelu(x_i W1[i] + b1[i]) W2[i] + b2[i]. One autograd node for the layer's experts
// (LoopExperts below), whose backward writes each expert's weight gradients into
// their place in the stacked gradient (no stack of per-expert gradients, no
// per-expert nodes) with the operations autograd would run for these ops, in the
// same order: the same bits. rows(i) pads expert i's rows on the bf16 CPU path.
struct LoopSpec {
  std::vector<int64_t> counts, start;  // rows per expert and first row
  bool pad = false;
  RowsAlloc alloc;  // the output's allocation (empty: at::empty)
  // Under autocast: the type each expert's weight matrices are cast to, one expert at
  // a time (Undefined: used as they are).
  at::ScalarType compute = at::ScalarType::Undefined;
  at::Tensor weight(const at::Tensor& w, size_t i) const {
    return compute == at::ScalarType::Undefined ? w[static_cast<int64_t>(i)] : w[static_cast<int64_t>(i)].to(compute);
  }
  int64_t rows(size_t i) const { return pad ? padded_rows(counts[i]) : counts[i]; }
};

// Expert i's input rows as its GEMM reads them (padded with zero rows on the bf16 CPU path).
at::Tensor expert_rows(const at::Tensor& x, const LoopSpec& s, size_t i) {
  const at::Tensor xi = x.narrow(0, s.start[i], s.counts[i]);
  const int64_t rows = s.rows(i);
  return rows == s.counts[i] ? xi : at::constant_pad_nd(xi, {0, 0, 0, rows - s.counts[i]});
}

// The forward over all experts; with `saved`, keeps what backward needs (per expert
// with rows: its padded input, its pre-activation, its activation and its two weight
// matrices as the products used them).
at::Tensor loop_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                        const at::Tensor& b2, const LoopSpec& s, ExpertHooks* hooks, std::vector<at::Tensor>* saved) {
  at::Tensor out;
  for (size_t i = 0; i < s.counts.size(); ++i) {
    if (s.counts[i] == 0) continue;
    if (hooks) hooks->rows_ready(static_cast<int>(i));
    const at::Tensor xi = expert_rows(x, s, i);
    const at::Tensor w1i = s.weight(w1, i), w2i = s.weight(w2, i);
    const at::Tensor pre = at::addmm(b1[i], xi, w1i);
    const at::Tensor h = at::gelu(pre, "tanh");
    if (!out.defined()) out = s.alloc ? s.alloc(x.size(0), w2.size(2), h.options()) : at::empty({x.size(0), w2.size(2)}, h.options());
    at::Tensor yo = out.narrow(0, s.start[i], s.counts[i]);
    if (s.rows(i) == s.counts[i]) at::addmm_out(yo, b2[i], h, w2i);
    else yo.copy_(at::addmm(b2[i], h, w2i).narrow(0, 0, s.counts[i]));
    if (hooks) hooks->outputs_done(static_cast<int>(i), yo);
    if (saved) saved->insert(saved->end(), {xi, pre, h, w1i, w2i});
  }
  return out;
}

struct LoopExperts : public torch::autograd::Function<LoopExperts> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                            const at::Tensor& w2, const at::Tensor& b2, const LoopSpec& s, const ExpertHooksPtr& hooks) {
    std::vector<at::Tensor> saved;
    at::Tensor out = loop_forward(x, w1, b1, w2, b2, s, hooks.get(), &saved);
    ctx->save_for_backward({w1, w2});
    ctx->saved_data["saved"] = saved;
    ctx->saved_data["counts"] = s.counts;
    ctx->saved_data["start"] = s.start;
    ctx->saved_data["pad"] = s.pad;
    ctx->saved_data["compute"] = static_cast<int64_t>(s.compute);
    ctx->saved_data["b1_dtype"] = static_cast<int64_t>(b1.scalar_type());
    ctx->saved_data["b2_dtype"] = static_cast<int64_t>(b2.scalar_type());
    ctx->saved_data["x_rows"] = x.size(0);
    if (hooks) ctx->saved_data["hooks"] = c10::IValue::make_capsule(hooks);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto vars = ctx->get_saved_variables();
    const at::Tensor &w1 = vars[0], &w2 = vars[1];
    const std::vector<at::Tensor> saved = ctx->saved_data["saved"].toTensorVector();
    LoopSpec s;
    s.counts = ctx->saved_data["counts"].toIntVector();
    s.start = ctx->saved_data["start"].toIntVector();
    s.pad = ctx->saved_data["pad"].toBool();
    s.compute = static_cast<at::ScalarType>(ctx->saved_data["compute"].toInt());
    ExpertHooksPtr hooks;
    if (ctx->saved_data.count("hooks"))
      hooks = c10::static_intrusive_pointer_cast<ExpertHooks>(ctx->saved_data["hooks"].toCapsule());
    const int64_t H = w2.size(2), F = w1.size(2), E = w1.size(0);
    const auto b1_dtype = static_cast<at::ScalarType>(ctx->saved_data["b1_dtype"].toInt());
    const auto b2_dtype = static_cast<at::ScalarType>(ctx->saved_data["b2_dtype"].toInt());
    at::Tensor gy = grads[0];
    at::Tensor gw1 = at::empty_like(w1, at::MemoryFormat::Contiguous), gw2 = at::empty_like(w2, at::MemoryFormat::Contiguous);
    at::Tensor gb1 = at::empty({E, F}, w1.options().dtype(b1_dtype)), gb2 = at::empty({E, H}, w2.options().dtype(b2_dtype));
    at::Tensor gx;
    // Experts last to first, as autograd ran their nodes.
    size_t k = saved.size();
    for (size_t i = s.counts.size(); i-- > 0;) {
      if (s.counts[i] == 0) {
        gw1[i].zero_(), gw2[i].zero_(), gb1[i].zero_(), gb2[i].zero_();  // as unbind's backward for unused experts
        continue;
      }
      k -= 5;
      const at::Tensor &xi = saved[k], &pre = saved[k + 1], &h = saved[k + 2], &w1i = saved[k + 3],
                       &w2i = saved[k + 4];
      at::Tensor dy = gy.defined() ? gy.narrow(0, s.start[i], s.counts[i])
                                   : at::zeros({s.counts[i], H}, h.options());
      if (hooks) dy = hooks->output_grad(static_cast<int>(i), dy);
      const int64_t rows = s.rows(i);
      if (rows != s.counts[i]) dy = at::constant_pad_nd(dy, {0, 0, 0, rows - s.counts[i]});
      // addmm's backward: d mat2 = mat1^T g, d mat1 = g mat2^T, d bias = g summed to the bias.
      // Under autocast each weight gradient is computed in the compute type and widened
      // into its place (what the cast's backward did for the stacked gradient).
      at::Tensor gw2_i = gw2[i], gb2_i = gb2[i], gw1_i = gw1[i], gb1_i = gb1[i];
      if (gw2_i.scalar_type() == h.scalar_type()) at::mm_out(gw2_i, h.t(), dy);
      else gw2_i.copy_(at::mm(h.t(), dy));
      gb2_i.copy_(at::sum_to(dy, at::IntArrayRef{H}));
      const at::Tensor dpre = at::gelu_backward(at::mm(dy, w2i.t()), pre, "tanh");
      if (gw1_i.scalar_type() == dpre.scalar_type()) at::mm_out(gw1_i, xi.t(), dpre);
      else gw1_i.copy_(at::mm(xi.t(), dpre));
      gb1_i.copy_(at::sum_to(dpre, at::IntArrayRef{F}));
      const at::Tensor dxi = at::mm(dpre, w1i.t());
      if (!gx.defined()) gx = at::empty({ctx->saved_data["x_rows"].toInt(), dxi.size(1)}, dxi.options());
      at::Tensor gxi = gx.narrow(0, s.start[i], s.counts[i]);
      gxi.copy_(rows == s.counts[i] ? dxi : dxi.narrow(0, 0, s.counts[i]));
      if (hooks) hooks->input_grad_done(static_cast<int>(i), gxi);
    }
    return {gx, gw1, gb1, gw2, gb2, at::Tensor(), at::Tensor()};
  }
};
}  // namespace

at::Tensor ExpertBankImpl::forward_loop(const at::Tensor& x, const std::vector<int64_t>& counts,
                                        const ExpertHooksPtr& hooks, const RowsAlloc& alloc) {
  // bf16 products on CPUs go to oneDNN, which generates a kernel for every new
  // shape (~0.6 ms each on a Xeon with AMX, against ~0.04 ms for the product
  // itself at the tiny default's sizes) and keeps 1024 of them: expert row counts
  // change every step, so nearly every expert GEMM paid for a new kernel. Rows are
  // padded with zeros to one of 8 sizes per octave (< 12.5% more rows), which
  // bounds the shapes; zero rows add nothing to any gradient, and the padded rows'
  // outputs are dropped.
  LoopSpec s;
  s.pad = cpu_bf16(x);
  s.alloc = alloc;
  s.counts = counts;
  s.start.assign(1, 0);
  for (int64_t n : counts) s.start.push_back(s.start.back() + n);
  if (s.start.back() == 0) return x.narrow(0, 0, 0) * 0;  // keeps the graph connected to x
  // Under autocast each expert's weight matrices are cast when it computes (the values
  // of autocast's cast), and its weight gradients are widened into the float32
  // gradient as they are computed: a cast of the stacked weights and of the stacked
  // gradient made four fresh tensors of 151-302 MB per layer and step at 4096 x 768,
  // E = 32, each above glibc's mmap threshold and so page-faulted in again every step,
  // and the GEMMs read the stacked bf16 weights back from memory; one expert's cast
  // reuses heap blocks and is still in cache for its GEMM (that layer 22% faster,
  // docs/performance.md). The biases are cast
  // stacked (small), and the rows where they are not in that type yet (autocast would
  // cast each expert's rows; the MoE layer casts before the dispatch).
  at::Tensor xc = x, b1c = b1, b2c = b2;
  if (const auto dev = x.device().type(); at::autocast::is_autocast_enabled(dev)) {
    const auto dt = at::autocast::get_autocast_dtype(dev);
    if (w1.scalar_type() != dt) s.compute = dt;
    b1c = b1.to(dt), b2c = b2.to(dt);
    if (x.is_floating_point()) xc = x.to(dt);
  }
  const at::Tensor &w1c = w1, &w2c = w2;
  // One autograd node for all experts (its backward writes the stacked weight
  // gradients in place: on 4096 x 768, E = 32, bf16 the stack of per-expert
  // gradients and the per-expert nodes had cost ~85 of ~800 ms); without gradients,
  // the same loop saving nothing.
  const bool grad = at::GradMode::is_enabled() &&
                    (xc.requires_grad() || w1c.requires_grad() || b1c.requires_grad() || w2c.requires_grad() ||
                     b2c.requires_grad());
  if (grad) return LoopExperts::apply(xc, w1c, b1c, w2c, b2c, s, hooks);
  return loop_forward(xc, w1c, b1c, w2c, b2c, s, hooks.get(), nullptr);
}

}  // namespace moeprune
