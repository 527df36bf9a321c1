// How checkpoints lie on disk (docs/checkpoints.md): one directory per checkpoint
// under a root, named ckpt-<sequence>-<phase>-step<step>; saves go to
// "<root>/.tmp-<name>", are fsynced and renamed; the "latest" pointer is replaced
// last and only the newest `keep` checkpoints stay. Inside: dense.safetensors
// (replicated tensors, rank 0), experts-rNNNNN.safetensors (rank N's experts, one
// tensor per expert) and manifest.json.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "ckpt/manifest.h"

namespace moeprune {

inline constexpr const char* kDenseFile = "dense.safetensors";
std::string expert_file(int rank);  // experts-r00003.safetensors
// ckpt-000007-finetune-step00000500
std::string checkpoint_name(int64_t sequence, const std::string& phase, int64_t step);
// The phase label of a checkpoint directory name ("" when it is not one).
std::string checkpoint_phase(const std::string& name);

// The stored name of expert `id`'s slice of a stacked tensor:
// "blocks.3.moe.experts.w1", 5 -> "blocks.3.moe.experts.e5.w1".
std::string expert_tensor_name(const std::string& stacked, int id);
// The inverse: {"blocks.3.moe.experts.w1", 5}; id -1 when name is not an expert slice.
std::pair<std::string, int> parse_expert_tensor_name(const std::string& name);

// The directory "latest" points to under root, or "" when there is none.
std::string latest_checkpoint(const std::string& root);
// A checkpoint directory, or a root standing for its latest checkpoint.
std::string resolve_checkpoint(const std::string& dir_or_root);
// Complete checkpoints (with a manifest) under root, oldest first.
std::vector<std::string> complete_checkpoints(const std::string& root);
// The sequence number the next checkpoint under root gets.
int64_t next_sequence(const std::string& root);
// Points "latest" at name (atomically) and deletes all but the newest `keep`.
void publish(const std::string& root, const std::string& name, int keep);

void fsync_path(const std::string& path);
// CRC-32 of a whole file.
uint32_t file_crc32(const std::string& path);
uint32_t text_crc32(const std::string& text);
// Checks sizes and CRCs of the named files (all when empty). UserError on the first mismatch.
void verify_files(const Manifest& m, const std::vector<std::string>& names = {});

}  // namespace moeprune
