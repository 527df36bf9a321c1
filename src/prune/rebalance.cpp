#include "prune/rebalance.h"

#include <algorithm>
#include <numeric>

#include "core/error.h"
#include "train/trainer.h"

namespace moeprune {

double load_imbalance(const std::vector<double>& loads, const std::vector<int>& rank, int W) {
  std::vector<double> per(static_cast<size_t>(W), 0.0);
  double total = 0;
  for (size_t i = 0; i < loads.size(); ++i) {
    per[static_cast<size_t>(rank[i])] += loads[i];
    total += loads[i];
  }
  const double mean = total / W;
  return mean > 0 ? *std::max_element(per.begin(), per.end()) / mean : 1.0;
}

namespace {
constexpr double kMiB = 1 << 20;

// The largest per-rank load, an expert's load split evenly among its copies.
double max_rank_load(const std::vector<double>& loads, const std::vector<std::vector<int>>& ranks, int W) {
  std::vector<double> per(static_cast<size_t>(W), 0.0);
  for (size_t i = 0; i < loads.size(); ++i)
    for (int r : ranks[i]) per[static_cast<size_t>(r)] += loads[i] / static_cast<double>(ranks[i].size());
  return *std::max_element(per.begin(), per.end());
}

// Packs the copies (copies[e] of expert e) on W ranks, at most max_copies per rank,
// largest load per copy first, each to the least loaded rank with room that holds
// no copy of the expert (ties: the expert's current rank, then the lower rank).
// Empty when they do not fit.
std::vector<std::vector<int>> pack_copies(const std::vector<double>& loads, const std::vector<int>& copies,
                                          const std::vector<int>& current_rank, int W, int max_copies) {
  const int n = static_cast<int>(loads.size());
  std::vector<std::pair<int, int>> units;  // (expert, copy)
  for (int e = 0; e < n; ++e)
    for (int c = 0; c < copies[e]; ++c) units.push_back({e, c});
  std::stable_sort(units.begin(), units.end(), [&](const auto& a, const auto& b) {
    return loads[a.first] / copies[a.first] > loads[b.first] / copies[b.first];
  });
  std::vector<std::vector<int>> out(static_cast<size_t>(n));
  std::vector<double> load(static_cast<size_t>(W), 0.0);
  std::vector<int> count(static_cast<size_t>(W), 0);
  for (const auto& [e, c] : units) {
    int best = -1;
    for (int r = 0; r < W; ++r) {
      if (count[r] >= max_copies || std::find(out[e].begin(), out[e].end(), r) != out[e].end()) continue;
      if (best < 0 || load[r] < load[best] - 1e-12 ||
          (std::abs(load[r] - load[best]) <= 1e-12 && r == current_rank[e] && best != current_rank[e]))
        best = r;
    }
    if (best < 0) return {};
    out[e].push_back(best);
    load[best] += loads[e] / copies[e];
    ++count[best];
  }
  return out;
}
}  // namespace

double load_imbalance(const std::vector<double>& loads, const std::vector<std::vector<int>>& ranks, int W) {
  double total = 0;
  for (double x : loads) total += x;
  const double mean = total / W;
  return mean > 0 ? max_rank_load(loads, ranks, W) / mean : 1.0;
}

std::vector<std::vector<int>> replicated_placement(const std::vector<double>& loads,
                                                   const std::vector<int>& current_rank, int W, int max_copies,
                                                   double target) {
  const int n = static_cast<int>(loads.size());
  std::vector<std::vector<int>> best;
  for (int r : balanced_placement(loads, current_rank, W)) best.push_back({r});
  double best_max = max_rank_load(loads, best, W);
  std::vector<int> copies(static_cast<size_t>(n), 1);
  int total = n;
  while (load_imbalance(loads, best, W) > target && total < W * max_copies) {
    // The expert with the largest load per copy that can take another copy.
    int hot = -1;
    for (int e = 0; e < n; ++e)
      if (copies[e] < W && (hot < 0 || loads[e] / copies[e] > loads[hot] / copies[hot] + 1e-12)) hot = e;
    if (hot < 0 || loads[hot] <= 0) break;
    ++copies[hot];
    ++total;
    auto packed = pack_copies(loads, copies, current_rank, W, max_copies);
    if (packed.empty()) break;
    const double m = max_rank_load(loads, packed, W);
    if (m < best_max - 1e-9 * std::max(1.0, best_max)) {
      best = std::move(packed);
      best_max = m;
    }
  }
  // Primary copy: the expert's current rank when it holds one (nothing moves for it).
  for (int e = 0; e < n; ++e) {
    auto& rs = best[static_cast<size_t>(e)];
    const auto it = std::find(rs.begin(), rs.end(), current_rank[e]);
    if (it != rs.end()) std::rotate(rs.begin(), it, it + 1);
  }
  return best;
}

int replica_copies_per_rank(int experts_before, int survivors, int W, double memory_mb, int moe_layers, int hidden,
                            int mlp_dim) {
  if (memory_mb <= 0) return std::max((experts_before + W - 1) / W, (survivors + W - 1) / W);
  const double per_layer = memory_mb * kMiB / std::max(1, moe_layers);
  return (survivors + W - 1) / W + static_cast<int>(per_layer / expert_copy_bytes(hidden, mlp_dim));
}

std::vector<int> balanced_placement(const std::vector<double>& loads, const std::vector<int>& current_rank, int W) {
  const int n = static_cast<int>(loads.size());
  const int base = n / W, extra = n % W;  // `extra` ranks hold base + 1 experts
  auto max_load = [&](const std::vector<int>& r) {
    std::vector<double> per(static_cast<size_t>(W), 0.0);
    for (int e = 0; e < n; ++e) per[r[e]] += loads[e];
    return *std::max_element(per.begin(), per.end());
  };
  auto even = [&](const std::vector<int>& r) {
    std::vector<int> c(static_cast<size_t>(W), 0);
    for (int x : r) {
      if (x < 0 || x >= W) return false;
      ++c[x];
    }
    int big = 0;
    for (int x : c) {
      if (x != base && x != base + 1) return false;
      big += x == base + 1;
    }
    return big == extra;
  };
  // 1. Longest processing time first, in rank space; ties go to the expert's current rank.
  std::vector<int> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return loads[a] > loads[b]; });
  std::vector<int> rank(static_cast<size_t>(n), -1), count(static_cast<size_t>(W), 0);
  std::vector<double> load(static_cast<size_t>(W), 0.0);
  int big = 0;
  for (int e : order) {
    int best = -1;
    for (int r = 0; r < W; ++r) {
      const bool room = count[r] < base || (count[r] == base && big < extra);
      if (!room) continue;
      if (best < 0 || load[r] < load[best] - 1e-12 ||
          (std::abs(load[r] - load[best]) <= 1e-12 && r == current_rank[e] && best != current_rank[e]))
        best = r;
    }
    rank[e] = best;
    load[best] += loads[e];
    if (++count[best] == base + 1) ++big;
  }
  // 2. Swaps between the most loaded rank and any other while they lower the larger load.
  for (int iter = 0; iter < 100 * n + 100; ++iter) {
    const int a = static_cast<int>(std::max_element(load.begin(), load.end()) - load.begin());
    double best_gain = 1e-12;
    int bx = -1, by = -1;
    for (int x = 0; x < n; ++x) {
      if (rank[x] != a) continue;
      for (int y = 0; y < n; ++y) {
        const int b = rank[y];
        const double d = loads[x] - loads[y];
        if (b == a || d <= 0) continue;
        const double gain = std::max(load[a], load[b]) - std::max(load[a] - d, load[b] + d);
        if (gain > best_gain) {
          best_gain = gain;
          bx = x;
          by = y;
        }
      }
    }
    if (bx < 0) break;
    const int b = rank[by];
    const double d = loads[bx] - loads[by];
    load[a] -= d;
    load[b] += d;
    std::swap(rank[bx], rank[by]);
  }
  // 3. Fewer moves at no cost: swap pairs that put an expert back on its current rank
  //    without raising the largest load.
  const double target = *std::max_element(load.begin(), load.end());
  bool changed = true;
  for (int iter = 0; changed && iter < 10 * n + 10; ++iter) {
    changed = false;
    for (int x = 0; x < n; ++x) {
      if (current_rank[x] < 0 || rank[x] == current_rank[x]) continue;
      const int a = rank[x], b = current_rank[x];
      int best_y = -1, best_home = -1;
      for (int y = 0; y < n; ++y) {
        if (rank[y] != b) continue;
        const double d = loads[x] - loads[y];
        if (load[a] - d > target + 1e-9 || load[b] + d > target + 1e-9) continue;
        const int home = (current_rank[y] == a) ? 2 : (current_rank[y] == b ? 0 : 1);  // y leaving home costs
        if (home > best_home) {
          best_home = home;
          best_y = y;
        }
      }
      if (best_y >= 0 && best_home >= 1) {  // net gain: x returns home, y does not leave its home
        const double d = loads[x] - loads[best_y];
        load[a] -= d;
        load[b] += d;
        std::swap(rank[x], rank[best_y]);
        changed = true;
      }
    }
  }
  // 4. The current placement wins when it is as good.
  if (even(current_rank) && max_load(current_rank) <= max_load(rank) + 1e-9) return current_rank;
  return rank;
}

namespace {


// Old router columns (of one member) that the new router keeps, matched by expert id;
// undefined when they are the same columns.
at::Tensor kept_columns(const MoeLayerImpl& old_layer, const MoeLayerImpl& new_layer, int member) {
  const auto& old_ids = old_layer.router_column_ids(member);
  const auto& new_ids = new_layer.router_column_ids(member);
  if (old_ids == new_ids) return at::Tensor();
  std::vector<int64_t> cols;
  for (int id : new_ids) {
    const auto it = std::find(old_ids.begin(), old_ids.end(), id);
    require(it != old_ids.end(), concat("prune: expert ", id, " of block ", new_layer.layer(),
                                        " has no router column in the model being pruned"));
    cols.push_back(it - old_ids.begin());
  }
  return at::tensor(cols, at::kLong);
}

}  // namespace

static Migration rebuild(const VisionTransformer& old_model, const std::vector<ParamSlot>& old_slots,
                         const ModelConfig& nc, const std::vector<Placement>& placements, Comms comms, uint64_t seed);

Migration apply_plan(const VisionTransformer& old_model, const std::vector<ParamSlot>& old_slots,
                     const PrunePlan& plan, const std::vector<Placement>& placements, Comms comms, uint64_t seed) {
  const ModelConfig& oc = old_model->config();
  for (const auto& l : plan.layers) {
    const auto old_ids = oc.layer_experts(l.block);
    for (int id : l.kept)
      require(std::binary_search(old_ids.begin(), old_ids.end(), id),
              concat("prune: the plan keeps expert ", id, " of block ", l.block, ", which the model does not have"));
  }
  require(oc.kept_experts.empty() || oc.pruned_routing == plan.routing,
          concat("prune: the model was pruned with '", name_of(oc.pruned_routing), "' routing, the plan uses '",
                 name_of(plan.routing), "'"));
  return rebuild(old_model, old_slots, pruned_config(oc, plan), placements, comms, seed);
}

Migration replace_experts(const VisionTransformer& model, const std::vector<ParamSlot>& slots,
                          const std::vector<Placement>& placements, Comms comms, uint64_t seed) {
  return rebuild(model, slots, model->config(), placements, comms, seed);
}

static Migration rebuild(const VisionTransformer& old_model, const std::vector<ParamSlot>& old_slots,
                         const ModelConfig& nc, const std::vector<Placement>& placements, Comms comms,
                         uint64_t seed) {
  at::NoGradGuard ng;
  Migration mig;
  mig.model = build_model(nc, placements, comms.ep(), old_model->parameters().front().device(), seed,
                          old_model->runtime());
  const bool with_state = !old_slots.empty() && old_slots.front().m1.defined();
  std::map<std::string, const ParamSlot*> old_state;
  for (const auto& s : old_slots) old_state[s.name] = &s;

  auto old_params = old_model->named_parameters();
  const auto old_layers = old_model->moe_layers();
  const auto new_layers = mig.model->moe_layers();
  std::map<std::string, std::pair<at::Tensor, at::Tensor>> moments;  // parameter -> its optimiser state (m1, m2)
  // Dense parameters (and their state): copied, router columns selected.
  for (auto& item : mig.model->named_parameters()) {
    const std::string& name = item.key();
    if (is_expert_param(name)) continue;
    at::Tensor src = old_params[name];
    const ParamSlot* st = old_state.count(name) ? old_state.at(name) : nullptr;
    at::Tensor m1 = st && st->m1.defined() ? st->m1 : at::Tensor();
    at::Tensor m2 = st && st->m2.defined() ? st->m2 : at::Tensor();
    const auto pos = name.find(".moe.routers.");
    if (pos != std::string::npos) {
      const int block = block_of_param(name);
      const int member = std::stoi(name.substr(pos + 13, name.find('.', pos + 13) - pos - 13));
      for (size_t l = 0; l < new_layers.size(); ++l) {
        if (new_layers[l]->layer() != block) continue;
        at::Tensor cols = kept_columns(*old_layers[l], *new_layers[l], member);
        if (cols.defined()) {
          cols = cols.to(src.device());
          src = src.index_select(1, cols);
          if (m1.defined()) m1 = m1.index_select(1, cols);
          if (m2.defined()) m2 = m2.index_select(1, cols);
        }
      }
    }
    item.value().copy_(src);
    moments[name] = {m1.defined() ? m1.clone() : m1, m2.defined() ? m2.clone() : m2};
  }
  // Experts: one all-to-all per MoE layer of rows [id | w1 | b1 | w2 | b2 | state...].
  const char* parts[] = {"w1", "b1", "w2", "b2"};
  for (size_t l = 0; l < old_layers.size(); ++l) {
    const MoeLayerImpl& ol = *old_layers[l];
    const MoeLayerImpl& nl = *new_layers[l];
    const std::string prefix = concat("blocks.", ol.layer(), ".moe.experts.");
    const auto& new_ids = nl.expert_ids();
    std::map<int, std::vector<int>> new_rank;  // kept id -> the ranks of its copies
    for (size_t s2 = 0; s2 < new_ids.size(); ++s2) new_rank[new_ids[s2]] = nl.placement().ranks_of(static_cast<int>(s2));
    const auto& old_local = ol.experts->expert_ids();
    const std::vector<bool> old_primary = ol.primary_copies();
    // Rows of this rank's surviving experts, grouped by destination.
    // Inside each expert-parallel group (every group moves its copies the same way).
    Communicator& ep = comms.ep();
    Communicator& ep_host = comms.ep_h();
    std::vector<std::vector<at::Tensor>> rows(static_cast<size_t>(ep.size()));
    std::vector<std::vector<int64_t>> row_ids(static_cast<size_t>(ep.size()));
    for (size_t i = 0; i < old_local.size(); ++i) {
      auto it = new_rank.find(old_local[i]);
      if (it == new_rank.end()) continue;  // pruned: freed with the old model
      if (!old_primary[i]) continue;       // a replica: its primary sends the expert
      std::vector<at::Tensor> pieces;
      for (const char* p : parts) {
        const std::string name = prefix + p;
        pieces.push_back(old_params[name][static_cast<int64_t>(i)].reshape({-1}));
        if (with_state) {
          pieces.push_back(old_state.at(name)->m1[static_cast<int64_t>(i)].reshape({-1}));
          if (old_state.at(name)->m2.defined()) pieces.push_back(old_state.at(name)->m2[static_cast<int64_t>(i)].reshape({-1}));
        }
      }
      at::Tensor row = at::cat(pieces);
      for (int dst : it->second) {  // to every copy of the expert
        rows[dst].push_back(row);
        row_ids[dst].push_back(old_local[i]);
      }
    }
    std::vector<int64_t> send_splits(static_cast<size_t>(ep.size()));
    std::vector<at::Tensor> flat;
    std::vector<int64_t> flat_ids;
    int64_t moved_rows = 0;
    for (int r = 0; r < ep.size(); ++r) {
      send_splits[r] = static_cast<int64_t>(rows[r].size());
      if (r != ep.rank()) moved_rows += send_splits[r];
      flat.insert(flat.end(), rows[r].begin(), rows[r].end());
      flat_ids.insert(flat_ids.end(), row_ids[r].begin(), row_ids[r].end());
    }
    const std::vector<int64_t> recv_splits = ep_host.exchange_counts(send_splits, 1);
    // Row width, identical on every rank: parameters (+ state) of one expert.
    int64_t width = 0;
    for (const char* p : parts) {
      const auto& t = old_params[prefix + p];
      int64_t one = 1;
      for (int64_t d = 1; d < t.dim(); ++d) one *= t.size(d);
      width += one * (with_state ? (old_state.at(prefix + p)->m2.defined() ? 3 : 2) : 1);
    }
    const auto dev = old_params[prefix + "w1"].device();
    at::Tensor send = flat.empty() ? at::empty({0, width}, at::TensorOptions().device(dev)) : at::stack(flat);
    at::Tensor got = ep.all_to_all(send, send_splits, recv_splits);
    at::Tensor got_ids = ep_host.all_to_all(at::tensor(flat_ids, at::kLong), send_splits, recv_splits);
    mig.bytes_moved += moved_rows * width * static_cast<int64_t>(send.element_size());
    // Unpack into the new bank, by id.
    const auto& mine = nl.experts->expert_ids();
    std::map<int, int64_t> local_index;
    for (size_t i = 0; i < mine.size(); ++i) local_index[mine[i]] = static_cast<int64_t>(i);
    auto new_params = mig.model->named_parameters();
    std::map<std::string, at::Tensor> m1, m2;
    for (const char* p : parts) {
      const std::string name = prefix + p;
      if (with_state) {
        m1[name] = at::zeros_like(new_params[name]);
        if (old_state.at(name)->m2.defined()) m2[name] = at::zeros_like(new_params[name]);
      }
    }
    for (int64_t row = 0; row < got.size(0); ++row) {
      const int id = static_cast<int>(got_ids[row].item<int64_t>());
      const int64_t li = local_index.at(id);
      int64_t off = 0;
      auto take = [&](at::Tensor dst) {
        const int64_t n = dst.numel();
        dst.copy_(got[row].narrow(0, off, n).view_as(dst));
        off += n;
      };
      for (const char* p : parts) {
        const std::string name = prefix + p;
        take(new_params[name][li]);
        if (with_state) {
          take(m1[name][li]);
          if (m2.count(name)) take(m2[name][li]);
        }
      }
    }
    for (const char* p : parts) {
      const std::string name = prefix + p;
      moments[name] = {m1.count(name) ? m1[name] : at::Tensor(), m2.count(name) ? m2[name] : at::Tensor()};
    }
  }
  at::Tensor b = at::tensor({mig.bytes_moved}, at::kLong);
  comms.host->all_reduce(b, ReduceOp::Sum);
  mig.bytes_moved = b.item<int64_t>();
  mig.slots = param_slots(mig.model);
  for (ParamSlot& s : mig.slots) std::tie(s.m1, s.m2) = moments.at(s.name);
  return mig;
}

}  // namespace moeprune
