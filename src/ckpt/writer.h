// Writing sharded checkpoints (ckpt/store.h for the layout): every rank captures
// its state owners' tensors (host copies), rank 0 writes the replicated tensors,
// every rank its experts, and rank 0 the manifest last, then moves "latest". With
// async, the files are written by a background thread while training continues and
// poll() completes the checkpoint. A crash at any moment leaves the previous
// checkpoint loadable.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/state.h"
#include "dist/world.h"

namespace moeprune {

class CheckpointWriter {
 public:
  CheckpointWriter(Comms comms, std::string root, int keep, bool async);
  // Joins a pending asynchronous writer thread but cannot finalise its checkpoint
  // (that is collective): call poll(true) before destroying a writer with a save pending.
  ~CheckpointWriter();
  // Collective. phase and step label the checkpoint (its name and manifest);
  // config_yaml is stored with it. Synchronous: returns once the checkpoint is
  // complete and "latest" points to it. Asynchronous: returns after copying the
  // tensors; poll() completes it.
  void save(const std::vector<const StateOwner*>& owners, const std::string& phase, int64_t step,
            const std::string& config_yaml);
  // Collective: completes a pending asynchronous save once every rank has written
  // its file. Returns true when nothing is pending any more.
  bool poll(bool wait);
  const std::string& last_saved() const { return last_dir_; }
  double last_save_seconds() const { return last_seconds_; }
  int64_t last_save_bytes() const { return last_bytes_; }

 private:
  struct Pending;
  void finalize(Pending& p);
  Comms comms_;
  std::string root_;
  int keep_;
  bool async_;
  std::unique_ptr<Pending> pending_;
  std::string last_dir_;
  double last_seconds_ = 0;
  int64_t last_bytes_ = 0;
};

}  // namespace moeprune
