// moeprune-bench dispatch: full dispatch + combine (plan, permute, block all-to-all,
// and back with the gate-weighted combine; no expert compute) for every dispatcher
// backend, against two raw all-to-alls of the same rows on the same communicator
// (MPI on CPUs, NCCL on GPUs), timed in alternation in the same run.
#include <algorithm>
#include <chrono>
#include <cstdio>

#include "benches.h"
#include "harness.h"
#include "dist/node_memory.h"
#include "model/dispatcher.h"

namespace moeprune::bench {

int dispatch(World& world, const Options& o) {
  const c10::Device dev = world.device();
  const auto dt = dev.is_cuda() ? at::kBFloat16 : at::kFloat;
  const int W = world.size();
  const int64_t tokens = o.tokens > 0 ? o.tokens : 4096;
  const int hidden = o.hidden > 0 ? o.hidden : 768;
  Communicator& comm = world.comm();
  // On CPUs the kernels' direct exchange once through node memory (the default
  // where every rank is on this node) and once through MPI only: a second
  // communicator over the same ranks, made without node memory.
  const bool node = comm.node_memory() != nullptr;
  MPI_Comm dup = MPI_COMM_NULL;
  std::unique_ptr<MpiCommunicator> mpi_only;
  if (node) {
    MPI_Comm_dup(world.host_comm().handle(), &dup);
    set_node_memory_enabled(false);
    mpi_only = std::make_unique<MpiCommunicator>(dup);
    mpi_only->node_memory();
    set_node_memory_enabled(true);
  }
  if (world.rank() == 0) {
    std::printf("dispatch + combine vs raw all-to-all, %d rank(s) on %s (%s), %lld tokens per rank, hidden %d, %s, "
                "median of %d\n",
                W, dev.str().c_str(), dev.is_cuda() ? "NCCL" : "MPI", static_cast<long long>(tokens), hidden,
                c10::toString(dt), o.reps);
    if (node)
      std::printf("  kernels: the direct exchange through node memory (the default on one node); kernels/mpi: the "
                  "same through MPI (runtime.node_memory: false)\n");
    std::printf("  %4s %2s %-11s %12s %12s %12s %12s %8s %8s  %s\n", "E", "k", "backend", "rows sent", "d+c ms",
                "raw ms", "d+c GB/s", "vs raw", "spread", "target >= 0.9x");
  }
  for (int E : {8, 32})
    for (int k : {1, 2}) {
      if (E < W) continue;
      at::manual_seed(1 + world.rank());
      const Placement pl = Placement::contiguous(E, W);
      const auto opt = at::TensorOptions().device(dev);
      at::Tensor probs = at::softmax(at::randn({1, tokens, E}, opt), -1);
      const Selection sel = TorchSelector().select(probs, k, tokens * k, false, {});  // no drops: all rows move
      RoutedChoices c{sel.expert.reshape({tokens, k}), sel.gate.reshape({tokens, k}), sel.keep.reshape({tokens, k}),
                      at::zeros({tokens, k}, sel.expert.options()), sel.position.reshape({tokens, k}), tokens * k, 1};
      at::Tensor x = at::randn({tokens, hidden}, opt).to(dt);
      at::NoGradGuard ng;
      for (int variant = 0; variant < (node ? 3 : 2); ++variant) {
        const DispatcherKind kind = variant == 0 ? DispatcherKind::Torch : DispatcherKind::Kernels;
        const auto d = make_dispatcher(kind, dev, variant == 2 ? *mpi_only : comm, pl);
        const std::string name = variant == 0 ? "torch" : !node ? "kernels" : variant == 1 ? "kernels" : "kernels/mpi";
        const auto plan = d->plan(c);
        if (o.verbose) {  // where the time goes
          const Timing tp = time_it(world, o.reps, [&] { d->plan(c); });
          at::Tensor y = d->dispatch(x, *plan);
          const Timing td = time_it(world, o.reps, [&] { d->dispatch(x, *plan); });
          const Timing tc = time_it(world, o.reps, [&] { d->combine(y, *plan); });
          at::Tensor pay = x.index_select(0, plan->token);
          const Timing tb = time_it(world, o.reps, [&] {
            comm.all_to_all_blocks(pay, plan->send_blocks, plan->recv_rows, plan->recv_blocks);
          });
          // The other ranks' rows only: gathered by an MPI indexed datatype, or by
          // index_select into a buffer and then sent contiguously.
          std::vector<RowBlock> sp, rp;
          for (const RowBlock& b : plan->send_blocks)
            if (b.peer != world.rank()) sp.push_back(b);
          for (const RowBlock& b : plan->recv_blocks)
            if (b.peer != world.rank()) rp.push_back(b);
          at::Tensor into = at::empty({plan->recv_rows, hidden}, x.options());
          const Timing tx = time_it(world, o.reps, [&] { comm.exchange_blocks(x, plan->token, sp, into, rp, {}); });
          const Timing tg = time_it(world, o.reps, [&] {
            comm.exchange_blocks(x.index_select(0, plan->token), {}, sp, into, rp, {});
          });
          // Overlap: the rank's own rows gathered while the others' are in flight (as
          // the direct exchange does), against the same two steps one after the other.
          std::vector<std::pair<RowBlock, RowBlock>> own;
          {
            std::vector<RowBlock> so, ro;
            for (const RowBlock& b : plan->send_blocks)
              if (b.peer == world.rank() && b.rows) so.push_back(b);
            for (const RowBlock& b : plan->recv_blocks)
              if (b.peer == world.rank() && b.rows) ro.push_back(b);
            for (size_t i = 0; i < so.size() && i < ro.size(); ++i) own.emplace_back(so[i], ro[i]);
          }
          const auto gather_own = [&] {
            for (const auto& [s, r] : own) {
              at::Tensor dst = into.narrow(0, r.offset, r.rows);
              at::index_select_out(dst, x, 0, plan->token.narrow(0, s.offset, s.rows));
            }
          };
          const Timing t_own = time_it(world, o.reps, gather_own);
          const Timing t_ovl = time_it(world, o.reps, [&] { comm.exchange_blocks(x, plan->token, sp, into, rp, gather_own); });
          const Timing t_seq = time_it(world, o.reps, [&] {
            comm.exchange_blocks(x, plan->token, sp, into, rp, {});
            gather_own();
          });
          // The same three steps one after the other, as timed in the table, split (rank 0's clock).
          std::vector<double> lp, ld, lc;
          time_it(world, o.reps, [&] {
            using Clock = std::chrono::steady_clock;
            const auto t0 = Clock::now();
            const auto p2 = d->plan(c);
            const auto t1 = Clock::now();
            at::Tensor y2 = d->dispatch(x, *p2);
            const auto t2 = Clock::now();
            at::Tensor out2 = d->combine(y2, *p2);
            const auto t3 = Clock::now();
            lp.push_back(std::chrono::duration<double>(t1 - t0).count());
            ld.push_back(std::chrono::duration<double>(t2 - t1).count());
            lc.push_back(std::chrono::duration<double>(t3 - t2).count());
          });
          const auto med = [](std::vector<double> v) {
            std::sort(v.begin(), v.end());
            return v.empty() ? 0.0 : v[v.size() / 2];
          };
          if (world.rank() == 0)
            std::printf("    in turn (rank 0): plan %.3f ms, dispatch %.3f ms, combine %.3f ms\n", 1e3 * med(lp),
                        1e3 * med(ld), 1e3 * med(lc));
          if (world.rank() == 0)
            std::printf("    plan %.3f ms, dispatch %.3f ms, combine %.3f ms, one block all-to-all %.3f ms; "
                        "other ranks' rows: indexed datatype %.3f ms, index_select + contiguous %.3f ms; own rows "
                        "%.3f ms; both overlapped %.3f ms, one after the other %.3f ms\n",
                        1e3 * tp.median, 1e3 * td.median, 1e3 * tc.median, 1e3 * tb.median, 1e3 * tx.median,
                        1e3 * tg.median, 1e3 * t_own.median, 1e3 * t_ovl.median, 1e3 * t_seq.median);
        }
        const int64_t sent = plan->token.size(0);
        at::Tensor payload = at::randn({sent, hidden}, opt).to(dt);
        int64_t recv_rows = 0;
        for (int64_t n : plan->recv_splits) recv_rows += n;
        at::Tensor back = at::randn({recv_rows, hidden}, opt).to(dt);
        // Dispatch + combine (with the plan) and the raw exchanges in alternation.
        const std::vector<Timing> both = time_alternating(
            world, o.reps,
            {[&] {
               const auto p2 = d->plan(c);
               at::Tensor y = d->dispatch(x, *p2);
               at::Tensor out = d->combine(y, *p2);
             },
             [&] {
               at::Tensor a = comm.all_to_all(payload, plan->send_splits, plan->recv_splits);
               at::Tensor b = comm.all_to_all(back, plan->recv_splits, plan->send_splits);
             }});
        const Timing &dc = both[0], &raw = both[1];
        // Bytes a rank sends in both directions, averaged over ranks (the same for both measurements).
        at::Tensor bytes_t = at::tensor({static_cast<double>((sent + recv_rows) * hidden * x.element_size())}, at::kDouble);
        world.host_comm().all_reduce(bytes_t, ReduceOp::Sum);
        const double gb = bytes_t.item<double>() / W / 1e9, vs = raw.median / dc.median;
        if (world.rank() == 0)
          std::printf("  %4d %2d %-11s %12lld %12.3f %12.3f %12.2f %7.2fx %7.0f%%  %s\n", E, k, name.c_str(),
                      static_cast<long long>(sent), 1e3 * dc.median, 1e3 * raw.median, gb / dc.median, vs,
                      100 * std::max(dc.spread(), raw.spread()), verdict(true, vs >= 0.9));
        nlohmann::json row = {{"tokens_per_rank", tokens}, {"hidden", hidden}, {"experts", E}, {"k", k},
                              {"backend", name}, {"rows", sent}, {"gb_per_s", gb / dc.median}, {"vs_raw", vs}};
        row.update(timing_json("dispatch_combine", dc));
        row.update(timing_json("raw_all_to_all", raw));
        json_row(world, "dispatch", row);
      }
    }
  if (mpi_only) {
    mpi_only.reset();
    MPI_Comm_free(&dup);
  }
  return 0;
}

}  // namespace moeprune::bench
