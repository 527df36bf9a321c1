// The closed sets of choices a job config names (criteria, routing modes, data
// sets, optimisers, ...), as enums with one name table each. The table is the only
// place a choice's spelling lives: the config reader parses with it, error messages
// list it, and code dispatches on the enum. Phases have their own, richer table
// (core/phase.h).
#pragma once
#include <array>
#include <string>
#include <string_view>
#include <utility>

#include "core/error.h"

namespace moeprune {

enum class Criterion { RouterNormChange, RouterDelta, HeavyHitter, SoftCount, Random };
enum class PruneScope { Global, PerLayer };
// How routers treat pruned experts: drop (columns removed, softmax over the
// survivors) or zero (softmax over all original experts; a pruned choice is void).
enum class PrunedRouting { Drop, Zero };
enum class DatasetKind { FashionMnist, Mnist, Cifar10, Cifar100, Shards, Planted };
enum class Cifar100Labels { Fine, Coarse };
enum class SplitPart { Train, Val, Test };
enum class OptimizerKind { Sgd, AdamW };
enum class Precision { Fp32, Bf16 };
// Which implementation routes and moves tokens (model/dispatcher.h): kernels on
// GPUs and torch ops on CPUs (auto), always torch ops, or always the kernels
// (their host path on CPUs: how the CPU suite tests them).
enum class DispatcherKind { Auto, Torch, Kernels };
// How the expert bank computes: a GEMM pair per local expert, a grouped GEMM or a batched product per side.
// Auto: grouped on GPUs; on CPUs batched for small experts in bf16, else loop (ExpertBankImpl::resolved_gemm).
enum class ExpertGemm { Auto, Loop, Grouped, Batched };
// How dense gradients are summed over ranks: buckets started during backward, or one
// flat all-reduce after it (train/grad_buckets.h).
enum class GradReduce { Overlap, Flat };

template <class E>
struct ChoiceNames;  // specialised below: static constexpr std::array<std::pair<E, std::string_view>, N> table

#define MOEPRUNE_CHOICES(E, ...)                                              \
  template <>                                                                 \
  struct ChoiceNames<E> {                                                     \
    static constexpr std::pair<E, std::string_view> table[] = {__VA_ARGS__}; \
  }

MOEPRUNE_CHOICES(Criterion, {Criterion::RouterNormChange, "router_norm_change"}, {Criterion::RouterDelta, "router_delta"},
                 {Criterion::HeavyHitter, "heavy_hitter"}, {Criterion::SoftCount, "soft_count"},
                 {Criterion::Random, "random"});
MOEPRUNE_CHOICES(PruneScope, {PruneScope::Global, "global"}, {PruneScope::PerLayer, "per_layer"});
MOEPRUNE_CHOICES(PrunedRouting, {PrunedRouting::Drop, "drop"}, {PrunedRouting::Zero, "zero"});
MOEPRUNE_CHOICES(DatasetKind, {DatasetKind::FashionMnist, "fashion_mnist"}, {DatasetKind::Mnist, "mnist"},
                 {DatasetKind::Cifar10, "cifar10"}, {DatasetKind::Cifar100, "cifar100"},
                 {DatasetKind::Shards, "shards"}, {DatasetKind::Planted, "planted"});
MOEPRUNE_CHOICES(Cifar100Labels, {Cifar100Labels::Fine, "fine"}, {Cifar100Labels::Coarse, "coarse"});
MOEPRUNE_CHOICES(SplitPart, {SplitPart::Train, "train"}, {SplitPart::Val, "val"}, {SplitPart::Test, "test"});
MOEPRUNE_CHOICES(OptimizerKind, {OptimizerKind::Sgd, "sgd"}, {OptimizerKind::AdamW, "adamw"});
MOEPRUNE_CHOICES(Precision, {Precision::Fp32, "fp32"}, {Precision::Bf16, "bf16"});
MOEPRUNE_CHOICES(DispatcherKind, {DispatcherKind::Auto, "auto"}, {DispatcherKind::Torch, "torch"},
                 {DispatcherKind::Kernels, "kernels"});
MOEPRUNE_CHOICES(GradReduce, {GradReduce::Overlap, "overlap"}, {GradReduce::Flat, "flat"});
MOEPRUNE_CHOICES(ExpertGemm, {ExpertGemm::Auto, "auto"}, {ExpertGemm::Loop, "loop"}, {ExpertGemm::Grouped, "grouped"},
                 {ExpertGemm::Batched, "batched"});
#undef MOEPRUNE_CHOICES

// The spelling of a choice.
template <class E>
std::string_view name_of(E value) {
  for (const auto& [v, n] : ChoiceNames<E>::table)
    if (v == value) return n;
  return "?";
}

template <class E>
std::string str(E value) {
  return std::string(name_of(value));
}

// "a or b" for two choices, "one of a, b, c" for more: how messages list them.
template <class E>
std::string expected_choices() {
  const auto& t = ChoiceNames<E>::table;
  const size_t n = std::size(t);
  std::string out = n > 2 ? "one of " : "";
  for (size_t i = 0; i < n; ++i) {
    if (i) out += n > 2 ? ", " : " or ";
    out += t[i].second;
  }
  return out;
}

// Parses text as a choice of E; `what` names where it came from ("config:
// prune.criterion"). UserError: "<what>='text', expected one of a, b, c".
template <class E>
E parse_choice(const std::string& text, const std::string& what) {
  for (const auto& [v, n] : ChoiceNames<E>::table)
    if (n == text) return v;
  throw UserError(concat(what, "='", text, "', expected ", expected_choices<E>()));
}

}  // namespace moeprune
