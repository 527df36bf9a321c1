// Google's vmoe checkpoints (google-research/vmoe, vmoe/checkpoints/partitioned.py):
// `<prefix>.index` + `<prefix>.data-NNNNN-of-MMMMM`, each file one msgpack object
// with vmoe's extension types. The index maps every parameter path to its global
// shape, dtype and the global slices ("chunks") it was written in, with the data
// file that holds each chunk; a data file maps leaf ids (positions in JAX's
// sorted-key flattening of the index tree) to [1-D sub-chunks, global slice] pairs.
//
// Readers ask for whole leaves or for rows along axis 0 (the expert axis of the
// expert tensors): only the data files holding a requested chunk are opened, they
// are mapped, not read, and only the requested chunks' bytes are touched, so a rank
// never holds more than its own slices. Structure, shapes, dtypes, slice coverage
// and finiteness are checked; anything wrong is a UserError naming the file and leaf.
// Written by vmoe's V1 writer (version "20220622") or by the older writer without a
// version (its leaf ids follow the same sorted order for dict trees). vmoe's newer
// Orbax checkpoints are a different format and are refused with a message.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace moeprune {

struct VmoeSlice {
  std::vector<int64_t> start, stop;  // half-open per axis
  int64_t volume() const;
  std::string str() const;           // "[0:1, 0:32, 0:64]"
};

struct VmoeLeaf {
  int id = 0;
  std::string path;              // "Encoder/encoderblock_1/Moe/Router/dense/kernel"
  std::vector<int64_t> shape;
  std::string dtype;             // numpy name: "float32", "bfloat16", ...
  std::vector<VmoeSlice> slices;  // the chunks the leaf was written in
  std::vector<int> shards;        // shards[i]: data file holding slices[i]
  int64_t numel() const;
  std::string shape_str() const;  // "(4, 32, 64)"
};

class VmoeCheckpoint {
 public:
  // Reads and checks `<prefix>.index`. UserError naming the file when it is missing,
  // not a vmoe index, or inconsistent (slices outside the shape, overlapping or not
  // covering it, shard numbers out of range, unknown dtype or extension type).
  explicit VmoeCheckpoint(const std::string& prefix);
  // True when `<path>.index` exists (what makes a path a vmoe prefix).
  static bool is_prefix(const std::string& path);

  const std::string& prefix() const { return prefix_; }
  const std::string& version() const { return version_; }  // "" when the index has none
  int shard_count() const { return shard_count_; }
  std::string index_path() const { return prefix_ + ".index"; }
  std::string shard_path(int shard) const;
  const std::vector<VmoeLeaf>& leaves() const { return leaves_; }
  const VmoeLeaf* find(const std::string& path) const;
  int64_t num_parameters() const;

  struct Request {
    std::string path;
    std::vector<int64_t> rows;  // indices along axis 0, in output order; empty = the whole leaf
  };
  // The requested parts as float32 CPU tensors, keyed by path: [rows.size(), shape[1:]...]
  // or the whole shape. Opens only the data files that hold requested chunks.
  std::map<std::string, at::Tensor> read(const std::vector<Request>& requests) const;

 private:
  std::string prefix_, version_;
  int shard_count_ = 0;
  std::vector<VmoeLeaf> leaves_;
  std::map<std::string, int> by_path_;
};

// What the index says, for people: version, files (present or missing, with sizes),
// and one line per array (id, path, shape, dtype, chunks and the files holding them).
std::string describe_vmoe(const VmoeCheckpoint& ck);

// Writes params ("/"-joined paths -> CPU tensors) as a vmoe V1 checkpoint that
// vmoe's restore_checkpoint reads: leaves whose path matches `expert_sharded` (the
// rows of axis 0 are experts) are written in `expert_chunks` chunks along axis 0
// (as vmoe writes experts sharded over devices), the rest as one chunk; chunks go to
// the data file with the fewest bytes so far (vmoe's rule), over num_shards files.
// dtypes: leaves are written in their tensor's dtype (float32 or bfloat16).
// Every file is written to a temporary name, flushed and renamed.
void write_vmoe_checkpoint(const std::string& prefix, const std::map<std::string, at::Tensor>& params,
                           int num_shards, int expert_chunks);

}  // namespace moeprune
