// Sharded checkpoints (docs/checkpoints.md). One directory per checkpoint:
//   manifest.json               written last: version, config, phase/step/loader
//                               position, RNG, optimiser config, placement at save,
//                               router-history counts, and every file's size and CRC-32
//   dense.safetensors           replicated parameters + their optimiser state +
//                               router reference weights (rank 0)
//   experts-rNNNNN.safetensors  the experts rank N held + their optimiser state,
//                               one tensor per expert named by layer and original id
// Saves go to "<root>/.tmp-<name>", are fsynced and renamed; the "latest" pointer is
// replaced last and only the newest `keep` checkpoints are kept, so a crash at any
// moment leaves the previous checkpoint loadable. Any number of ranks can load a
// checkpoint: each rank reads the experts it now holds from whichever shard has them.
#pragma once
#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/config.h"
#include "dist/world.h"
#include "model/vit.h"
#include "prune/router_history.h"
#include "train/optimizer.h"

namespace moeprune {

inline constexpr int kCheckpointVersion = 1;

// Where training stands; restored with the tensors.
struct TrainState {
  std::string phase;              // "pretrain" or "finetune"
  int64_t step = 0;               // optimiser steps completed in the phase
  int64_t epoch = 0;              // loader position of the next micro-batch
  int64_t loader_step = 0;
  std::vector<std::string> finished_phases;
};

struct CheckpointFile {
  std::string name;
  int64_t bytes = 0;
  uint32_t crc32 = 0;
};

struct ExpertLayout {
  int block = 0;                  // MoE block index
  std::vector<int> experts;       // original expert ids held by the layer
  std::vector<int> rank;          // rank[i] held experts[i] at save
};

struct Manifest {
  int version = kCheckpointVersion;
  TrainState state;
  uint64_t seed = 0;
  std::string config_yaml;
  int num_classes = 0;
  int world_size = 1;
  std::string optimizer;
  int64_t optimizer_steps = 0;
  std::vector<ExpertLayout> layers;
  std::string pruned_routing = "drop";
  std::map<int, LayerStats> history_counts;  // router history counts so far
  std::string history_records;               // JSON array of the records so far
  std::string rng_state_hex;                 // torch's default CPU generator
  std::vector<CheckpointFile> files;
  std::string dir;                           // where it was read from
};

// The checkpoint's model: cfg with the head size and surviving experts of the checkpoint.
ModelConfig model_config_of(const ModelConfig& cfg, const Manifest& m);
// Placements for world_size ranks: the saved ones when the world size is the same,
// else contiguous blocks of each layer's experts.
std::vector<Placement> placements_of(const Manifest& m, int world_size);

// Reads and checks <dir>/manifest.json (format, version, fields). UserError names
// the file and what was expected.
Manifest read_manifest(const std::string& dir);
// The directory "latest" points to under root, or "" when there is none.
std::string latest_checkpoint(const std::string& root);
// CRC-32 of a whole file.
uint32_t file_crc32(const std::string& path);
// Checks sizes and CRCs of the named files (all when empty). UserError on the first mismatch.
void verify_files(const Manifest& m, const std::vector<std::string>& names = {});

class CheckpointWriter {
 public:
  CheckpointWriter(Comms comms, std::string root, int keep, bool async);
  // Joins a pending asynchronous writer thread but cannot finalise its checkpoint
  // (that is collective): call poll(true) before destroying a writer with a save pending.
  ~CheckpointWriter();
  // Collective. Synchronous: returns once the checkpoint is complete and "latest"
  // points to it. Asynchronous: returns after copying the tensors; finish() or
  // poll() completes it.
  void save(const VisionTransformer& model, const Optimizer& opt, const TrainState& state, const JobConfig& cfg,
            const RouterHistory* history);
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

// Every rank: fills model parameters, optimiser state (when opt is given) and
// router history (when given) from the checkpoint. The model must have been built
// for the checkpoint's experts; the placement may differ from the one at save.
// Verifies the CRC of every file this rank reads. Returns the state to resume from.
TrainState load_checkpoint(const Manifest& m, VisionTransformer& model, Optimizer* opt, RouterHistory* history);

// `moeprune ckpt inspect|verify|export`: single-process tools.
std::string inspect_checkpoint(const std::string& dir);
// Writes every tensor (experts stacked per layer in id order, optimiser state
// included under "optim.*") to one safetensors file.
void export_checkpoint(const std::string& dir, const std::string& out);

}  // namespace moeprune
