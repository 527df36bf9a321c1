// What a stateful component (model parameters, optimiser, router history, data
// loader, pipeline progress) saves into a checkpoint and reads back. Components
// implement StateOwner; src/ckpt implements StateWriter / StateReader over files
// and the manifest, and knows nothing else about the components. A new piece of
// state is a new owner (or a new field of one): the checkpoint code does not change.
//
// Three kinds of state:
//   replicated tensors  the same on every rank (dense weights): written once
//   expert tensors      held by one rank, named by (MoE block, original expert id):
//                       written by that rank, read by whichever rank holds the
//                       expert now (resharding on any world size)
//   meta                small values (JSON) in the owner's section of the manifest
#pragma once
#include <ATen/ATen.h>

#include <nlohmann/json_fwd.hpp>
#include <string>

namespace moeprune {

class StateWriter {
 public:
  virtual ~StateWriter() = default;
  virtual void replicated(const std::string& name, const at::Tensor& t) = 0;
  // name: the tensor's stacked name ("blocks.3.moe.experts.w1"); t: expert `id`'s slice.
  virtual void expert(const std::string& name, int block, int id, const at::Tensor& t) = 0;
  // The owner's manifest section (a JSON object), identical on every rank.
  virtual nlohmann::json& meta() = 0;
};

class StateReader {
 public:
  virtual ~StateReader() = default;
  virtual bool has_replicated(const std::string& name) const = 0;
  // A read-only view (valid while the reader lives) of the stored tensor; UserError
  // naming the file and tensor when it is missing or its shape is not `shape`.
  virtual at::Tensor replicated(const std::string& name, at::IntArrayRef shape) const = 0;
  // The same, in whatever shape it was saved.
  virtual at::Tensor replicated(const std::string& name) const = 0;
  virtual bool has_expert(const std::string& name, int block, int id) const = 0;
  virtual at::Tensor expert(const std::string& name, int block, int id, at::IntArrayRef shape) const = 0;
  virtual const nlohmann::json& meta() const = 0;
  // Where the state comes from, for messages (a checkpoint directory).
  virtual const std::string& where() const = 0;
};

class StateOwner {
 public:
  virtual ~StateOwner() = default;
  // The owner's section in the manifest: "model", "optimizer", "router_history", ...
  virtual std::string state_key() const = 0;
  // Called on every rank (collective owners may communicate).
  virtual void save_state(StateWriter& out) const = 0;
  virtual void load_state(const StateReader& in) = 0;
};

}  // namespace moeprune
