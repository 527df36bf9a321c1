// moeprune-bench kernels: the dispatcher kernels' permute and unpermute+combine
// alone, GB/s (bytes read + written) against a device copy of the same bytes in
// the same run (the memory-bandwidth reference), and the torch ops doing the same.
#include <cstdio>

#include "benches.h"
#include "harness.h"
#include "model/fused_dispatch.h"

namespace moeprune::bench {

int kernels(World& world, const Options& o) {
  const int reps = o.reps;
  const c10::Device dev = world.device();
  if (world.rank() == 0) {
    std::printf("dispatcher kernels on %s (%s), median of %d; reference: a copy of the same bytes\n",
                dev.str().c_str(), dev.is_cuda() ? "CUDA kernels" : "host path of the kernels", reps);
    std::printf("  %-8s %7s %5s %2s %-20s %10s %10s %8s %8s  %s\n", "dtype", "tokens", "H", "k", "op", "ms", "GB/s",
                "vs copy", "spread",
                dev.is_cuda() ? "target (GPU) >= 0.78x copy = 70% of peak" : "(GPU target only)");
  }
  const auto opt = at::TensorOptions().device(dev);
  for (auto dt : {at::kFloat, at::kBFloat16})
    for (int64_t tokens : {4096, 16384})
      for (int64_t H : {768}) {
        const int64_t k = 2, A = tokens * k;
        at::manual_seed(2);
        at::Tensor choice = at::randperm(A, opt.dtype(at::kLong));
        at::Tensor token = choice.floor_divide(k), row_of = inverse_rows(choice, tokens, k);
        at::Tensor x = at::randn({tokens, H}, opt).to(dt), y = at::randn({A, H}, opt).to(dt);
        at::Tensor w = at::rand({tokens, k}, opt), big = at::empty({A, H}, opt.dtype(dt));
        auto bw = [&](double bytes, double t) { return bytes / t / 1e9; };
        const double es = static_cast<double>(x.element_size());
        const Timing copy = time_it(world, reps, [&] { big.copy_(y); });
        const Timing perm = time_it(world, reps, [&] { permute_rows(x, token); });
        const Timing comb = time_it(world, reps, [&] { combine_rows(y, row_of, w); });
        // The torch backend doing the same work.
        at::Tensor gate = w.reshape({-1}).index_select(0, choice);
        const Timing isel = time_it(world, reps, [&] { x.index_select(0, token); });
        const Timing iadd = time_it(world, reps, [&] {
          at::zeros({tokens, H}, x.options()).index_add(0, token, y * gate.unsqueeze(1).to(dt));
        });
        const double t_copy = copy.median;
        const double copy_bytes = 2.0 * A * H * es;
        const double perm_bytes = 2.0 * A * H * es + A * 8.0;                       // read rows, write rows, index
        const double comb_bytes = (A + tokens) * H * es + tokens * k * (8.0 + 4.0);  // read rows, write tokens, maps
        {
          const char* dn = dt == at::kFloat ? "float32" : "bfloat16";
          for (auto [name, tm, b] : {std::tuple{"copy (reference)", copy, copy_bytes},
                                     std::tuple{"permute", perm, perm_bytes},
                                     std::tuple{"unpermute+combine", comb, comb_bytes},
                                     std::tuple{"torch index_select", isel, perm_bytes},
                                     std::tuple{"torch mul+index_add", iadd, comb_bytes}}) {
            const double t = tm.median;
            // GPU target: >= 70% of peak bandwidth; a device copy reaches ~90% of peak
            // on H100/H200 (3.0 and 4.3 TB/s measured against 3.35 and 4.8), so 0.78x of the copy.
            const bool kernel_row = std::string(name) == "permute" || std::string(name) == "unpermute+combine";
            const double vs = bw(b, t) / bw(copy_bytes, t_copy);
            if (world.rank() == 0)
              std::printf("  %-8s %7lld %5lld %2lld %-20s %10.3f %10.1f %7.2fx %7.0f%%  %s\n", dn,
                          static_cast<long long>(tokens), static_cast<long long>(H), static_cast<long long>(k), name,
                          1e3 * t, bw(b, t), vs, 100 * tm.spread(), verdict(dev.is_cuda() && kernel_row, vs >= 0.78));
            nlohmann::json row = {{"dtype", dn}, {"tokens", tokens}, {"hidden", H}, {"k", k}, {"op", name},
                                  {"gb_per_s", bw(b, t)}, {"vs_copy", vs}};
            row.update(timing_json("op", tm));
            json_row(world, "kernels", row);
          }
        }
      }
  return 0;
}

}  // namespace moeprune::bench
