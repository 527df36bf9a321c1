#include "model/direct_exchange.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "core/error.h"

namespace moeprune {
namespace {

// Where a plan's rows go, split into the rank's own rows and the others'.
struct Route {
  int64_t tokens = 0, top_k = 0, send_rows = 0, recv_rows = 0;
  std::vector<RowBlock> send_peer, recv_peer;  // blocks to and from other ranks
  // The rank's own blocks, paired: send rows [so, so + n) are received at [ro, ro + n).
  struct Pair {
    int64_t so, ro, n;
  };
  std::vector<Pair> own;

  static Route of(const DispatchPlan& p, int me) {
    Route r;
    r.tokens = p.num_tokens;
    r.top_k = p.top_k;
    r.send_rows = p.token.size(0);
    r.recv_rows = p.recv_rows;
    std::vector<const RowBlock*> out, in;
    for (const RowBlock& b : p.send_blocks) {
      if (b.peer != me) r.send_peer.push_back(b);
      else if (b.rows) out.push_back(&b);
    }
    for (const RowBlock& b : p.recv_blocks) {
      if (b.peer != me) r.recv_peer.push_back(b);
      else if (b.rows) in.push_back(&b);
    }
    TORCH_CHECK(out.size() == in.size(), "direct exchange: rank ", me, " sends itself ", out.size(),
                " blocks but receives ", in.size());
    for (size_t i = 0; i < out.size(); ++i) {
      TORCH_CHECK(out[i]->rows == in[i]->rows, "direct exchange: own block ", i, " sends ", out[i]->rows,
                  " rows but receives ", in[i]->rows);
      r.own.push_back({out[i]->offset, in[i]->offset, out[i]->rows});
    }
    return r;
  }

  // Autograd keeps IValues only: the route as one integer vector.
  std::vector<int64_t> flat() const {
    std::vector<int64_t> v{tokens, top_k, send_rows, recv_rows, static_cast<int64_t>(send_peer.size()),
                           static_cast<int64_t>(recv_peer.size()), static_cast<int64_t>(own.size())};
    for (const auto* blocks : {&send_peer, &recv_peer})
      for (const RowBlock& b : *blocks) v.insert(v.end(), {b.peer, b.offset, b.rows});
    for (const Pair& q : own) v.insert(v.end(), {q.so, q.ro, q.n});
    return v;
  }
  static Route unflat(const std::vector<int64_t>& v) {
    Route r;
    r.tokens = v[0], r.top_k = v[1], r.send_rows = v[2], r.recv_rows = v[3];
    size_t i = 7;
    for (auto [blocks, n] : {std::pair{&r.send_peer, v[4]}, std::pair{&r.recv_peer, v[5]}})
      for (int64_t j = 0; j < n; ++j, i += 3) blocks->push_back({static_cast<int>(v[i]), v[i + 1], v[i + 2]});
    for (int64_t j = 0; j < v[6]; ++j, i += 3) r.own.push_back({v[i], v[i + 1], v[i + 2]});
    return r;
  }

  // Where the returned row of each choice n * top_k + j is, as a row of the
  // concatenation [own; back]: own rows (the rank's own experts' rows, recv_rows of
  // them) at their place among those, the other ranks' rows at recv_rows + their
  // send row in `back`; -1 for dropped choices. With the gate of each choice
  // (0 when dropped) when `gate` is given.
  std::pair<at::Tensor, at::Tensor> sources(const at::Tensor& choice, const at::Tensor& gate) const {
    at::Tensor where = at::full({tokens * top_k}, -1, at::kLong);
    at::Tensor weight = gate.defined() ? at::zeros({tokens * top_k}, at::kFloat) : at::Tensor();
    int64_t* w = where.data_ptr<int64_t>();
    const int64_t* c = choice.data_ptr<int64_t>();
    for (int64_t a = 0; a < send_rows; ++a) w[c[a]] = recv_rows + a;
    for (const Pair& q : own)
      for (int64_t i = 0; i < q.n; ++i) w[c[q.so + i]] = q.ro + i;
    if (gate.defined()) {
      float* g = weight.data_ptr<float>();
      const float* ga = gate.data_ptr<float>();
      for (int64_t a = 0; a < send_rows; ++a) g[c[a]] = ga[a];
    }
    return {where, weight};
  }
};

void save(torch::autograd::AutogradContext* ctx, const Route& r, const at::Tensor& token, Communicator& comm) {
  ctx->saved_data["route"] = r.flat();
  ctx->saved_data["token"] = token;
  ctx->saved_data["comm"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(&comm));
}
Communicator& comm_of(torch::autograd::AutogradContext* ctx) {
  return *reinterpret_cast<Communicator*>(static_cast<intptr_t>(ctx->saved_data["comm"].toInt()));
}

// Elements per task of the row-parallel loops: enough to amortise a task.
constexpr int64_t kGrainElements = 1024;

// out[n] = sum_j weight[n, j] * row(where[n, j]) over the K choices of token n
// whose `where` is >= 0; row(i) is own[i] for i < own rows, else back[i - own rows].
// Without weight: plain sums. Each output row is written once (no zero fill, no
// read-modify-write), rows of a token summed in choice order.
at::Tensor gather_sum(const at::Tensor& where, const at::Tensor& weight, int64_t K, const at::Tensor& own,
                      const at::Tensor& back) {
  const int64_t N = where.size(0) / std::max<int64_t>(K, 1), H = own.size(1), R = own.size(0);
  at::Tensor out = at::empty({N, H}, own.options());
  if (N == 0 || H == 0) return out;
  const int64_t* wh = where.data_ptr<int64_t>();
  const float* g = weight.defined() ? weight.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, own.scalar_type(), "gather_sum", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* y = own.data_ptr<scalar_t>();
    const scalar_t* b = back.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, kGrainElements / H), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        scalar_t* dst = o + n * H;
        bool first = true;
        for (int64_t j = 0; j < K; ++j) {
          const int64_t i = wh[n * K + j];
          if (i < 0) continue;
          const scalar_t* src = i < R ? y + i * H : b + (i - R) * H;
          const float w = g ? g[n * K + j] : 1.0f;
          if (first) {  // 0 + w * row, rounded as the torch ops' mul then index_add
            for (int64_t c = 0; c < H; ++c) dst[c] = static_cast<scalar_t>(w * static_cast<float>(src[c]));
          } else {
            for (int64_t c = 0; c < H; ++c) {
              const scalar_t prod = static_cast<scalar_t>(w * static_cast<float>(src[c]));
              dst[c] = static_cast<scalar_t>(static_cast<float>(dst[c]) + static_cast<float>(prod));
            }
          }
          first = false;
        }
        if (first)
          for (int64_t c = 0; c < H; ++c) dst[c] = scalar_t(0);
      }
    });
  });
  return out;
}

// out[i] = gate[i] * src[index[i]] (out: a contiguous run of rows).
void gather_scaled(at::Tensor out, const at::Tensor& src, const at::Tensor& index, const at::Tensor& gate) {
  const int64_t n = index.size(0), H = src.size(1);
  if (n == 0 || H == 0) return;
  const int64_t* idx = index.data_ptr<int64_t>();
  const float* g = gate.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "gather_scaled", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* s = src.data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, kGrainElements / H), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* row = s + idx[i] * H;
        const float w = g[i];
        for (int64_t c = 0; c < H; ++c) o[i * H + c] = static_cast<scalar_t>(w * static_cast<float>(row[c]));
      }
    });
  });
}

// dst[i] = <src[index[i]], rows[i]>, accumulated in float.
void row_dots(at::Tensor dst, const at::Tensor& src, const at::Tensor& index, const at::Tensor& rows) {
  const int64_t n = index.size(0), H = src.size(1);
  if (n == 0) return;
  const int64_t* idx = index.data_ptr<int64_t>();
  float* d = dst.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "row_dots", [&] {
    const scalar_t* s = src.data_ptr<scalar_t>();
    const scalar_t* y = rows.data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(H, 1)), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* a = s + idx[i] * H;
        const scalar_t* b = y + i * H;
        float acc[4] = {0, 0, 0, 0};  // four partial sums: the loop vectorises
        int64_t c = 0;
        for (; c + 4 <= H; c += 4)
          for (int u = 0; u < 4; ++u) acc[u] += static_cast<float>(a[c + u]) * static_cast<float>(b[c + u]);
        for (; c < H; ++c) acc[0] += static_cast<float>(a[c]) * static_cast<float>(b[c]);
        d[i] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
      }
    });
  });
}

struct DirectDispatchFn : public torch::autograd::Function<DirectDispatchFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x_in, const Route& r,
                            const at::Tensor& token, const at::Tensor& choice, Communicator* comm) {
    const at::Tensor x = x_in.contiguous();
    at::Tensor recv = at::empty({r.recv_rows, x.size(1)}, x.options());
    comm->exchange_blocks(x, token, r.send_peer, recv, r.recv_peer, [&] {
      for (const Route::Pair& q : r.own) {
        at::Tensor dst = recv.narrow(0, q.ro, q.n);
        at::index_select_out(dst, x, 0, token.narrow(0, q.so, q.n));
      }
    });
    save(ctx, r, token, *comm);
    ctx->saved_data["choice"] = choice;
    ctx->saved_data["width"] = x.size(1);
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    return recv;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const Route r = Route::unflat(ctx->saved_data["route"].toIntVector());
    const at::Tensor token = ctx->saved_data["token"].toTensor();
    Communicator& comm = comm_of(ctx);
    // Every rank takes part in the reverse exchange, also when its rows did not reach the loss.
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    const at::Tensor gr = grads[0].defined() ? grads[0].to(dtype).contiguous()
                                             : at::zeros({r.recv_rows, ctx->saved_data["width"].toInt()}, dtype);
    at::Tensor back = at::empty({r.send_rows, gr.size(1)}, gr.options());
    at::Tensor where;
    comm.exchange_blocks(gr, {}, r.recv_peer, back, r.send_peer,
                         [&] { where = r.sources(ctx->saved_data["choice"].toTensor(), {}).first; });
    return {gather_sum(where, {}, r.top_k, gr, back), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct DirectCombineFn : public torch::autograd::Function<DirectCombineFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& y_in, const at::Tensor& gate_in,
                            const Route& r, const at::Tensor& token, const at::Tensor& choice, Communicator* comm) {
    const at::Tensor y = y_in.contiguous();
    const at::Tensor gate = gate_in.detach().to(at::kFloat).contiguous();
    at::Tensor back = at::empty({r.send_rows, y.size(1)}, y.options());  // the other ranks' rows, in send order
    at::Tensor where, weight;
    comm->exchange_blocks(y, {}, r.recv_peer, back, r.send_peer,
                          [&] { std::tie(where, weight) = r.sources(choice, gate); });
    at::Tensor out = gather_sum(where, weight, r.top_k, y, back);
    save(ctx, r, token, *comm);
    ctx->saved_data["y"] = y;
    ctx->saved_data["back"] = back;
    ctx->saved_data["gate"] = gate;
    ctx->saved_data["gate_dtype"] = static_cast<int64_t>(gate_in.scalar_type());
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const Route r = Route::unflat(ctx->saved_data["route"].toIntVector());
    const at::Tensor token = ctx->saved_data["token"].toTensor();
    const at::Tensor y = ctx->saved_data["y"].toTensor(), back = ctx->saved_data["back"].toTensor();
    const at::Tensor gate = ctx->saved_data["gate"].toTensor();
    Communicator& comm = comm_of(ctx);
    const int64_t H = y.size(1);
    const at::Tensor g = grads[0].defined() ? grads[0].to(y.scalar_type()).contiguous()
                                            : at::zeros({r.tokens, H}, y.options());
    // d y[a] = gate[a] * g[token[a]]: the other ranks' rows are scaled here and sent
    // back; the own rows are written straight into the gradient while they travel.
    at::Tensor grad_y = at::empty({r.recv_rows, H}, y.options());
    at::Tensor scaled = at::empty({r.send_rows, H}, y.options());
    for (const RowBlock& b : r.send_peer)
      if (b.rows)
        gather_scaled(scaled.narrow(0, b.offset, b.rows), g, token.narrow(0, b.offset, b.rows),
                      gate.narrow(0, b.offset, b.rows));
    at::Tensor grad_gate = at::empty({r.send_rows}, gate.options());
    comm.exchange_blocks(scaled, {}, r.send_peer, grad_y, r.recv_peer, [&] {
      for (const Route::Pair& q : r.own) {
        gather_scaled(grad_y.narrow(0, q.ro, q.n), g, token.narrow(0, q.so, q.n), gate.narrow(0, q.so, q.n));
        row_dots(grad_gate.narrow(0, q.so, q.n), g, token.narrow(0, q.so, q.n), y.narrow(0, q.ro, q.n));
      }
      for (const RowBlock& b : r.send_peer)  // d gate[a] = <g[token[a]], y[a]>
        if (b.rows)
          row_dots(grad_gate.narrow(0, b.offset, b.rows), g, token.narrow(0, b.offset, b.rows),
                   back.narrow(0, b.offset, b.rows));
    });
    const auto gate_dtype = static_cast<at::ScalarType>(ctx->saved_data["gate_dtype"].toInt());
    return {grad_y, grad_gate.to(gate_dtype), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

void check_input_rows(const at::Tensor& t, int64_t rows, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.device().is_cpu(), "direct exchange: ", what, " must be [",
              rows, ", H] on the CPU, got ", t.sizes(), " on ", t.device());
}

}  // namespace

at::Tensor direct_dispatch(const at::Tensor& x, const DispatchPlan& plan, Communicator& comm) {
  check_input_rows(x, plan.num_tokens, "x");
  return DirectDispatchFn::apply(x, Route::of(plan, comm.rank()), plan.token.contiguous(), plan.choice.contiguous(),
                                 &comm);
}

at::Tensor direct_combine(const at::Tensor& y, const DispatchPlan& plan, Communicator& comm) {
  check_input_rows(y, plan.recv_rows, "y");
  return DirectCombineFn::apply(y, plan.gate, Route::of(plan, comm.rank()), plan.token.contiguous(),
                                plan.choice.contiguous(), &comm);
}

}  // namespace moeprune
