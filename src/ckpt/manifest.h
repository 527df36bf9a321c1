// The manifest of a sharded checkpoint (manifest.json, written last): what the
// checkpoint is (phase and step, a label the caller gives), the world size and
// config it was saved with, one section per state owner (core/state.h), the
// index of which expert shard holds which experts, and every file's size and
// CRC-32. The schema lives here once: to_json / manifest_from_json.
#pragma once
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace moeprune {

inline constexpr int kCheckpointVersion = 3;  // 3: the manifest carries its own CRC-32
inline constexpr const char* kCheckpointFormat = "moeprune-checkpoint";

struct CheckpointFile {
  std::string name;
  int64_t bytes = 0;
  uint32_t crc32 = 0;
};

// One rank's expert file and the experts it holds: MoE block -> original ids.
struct ExpertShard {
  std::string file;
  int rank = 0;
  std::map<int, std::vector<int>> experts;
};

struct Manifest {
  int version = kCheckpointVersion;
  std::string phase;               // the label given at save ("finetune")
  int64_t step = 0;                // and its step
  int world_size = 1;
  // Ranks per expert-parallel group when saved: the ranks 0..expert_parallel-1 (group
  // 0 of the mesh) wrote the expert shards, one each. 0 here, or absent in a
  // manifest file: world_size (no replicas). Read manifests always hold the value.
  int expert_parallel = 0;
  std::string config_yaml;         // the job config, resolved
  nlohmann::json state = nlohmann::json::object();  // state owner key -> its section
  std::vector<ExpertShard> shards;
  std::vector<CheckpointFile> files;
  std::string dir;                 // where it was read from (not stored)

  bool has_section(const std::string& key) const { return state.contains(key); }
  // Whether `files` lists a file of this name (only listed files are ever read).
  bool lists(const std::string& name) const;
  // UserError naming the checkpoint when the section is absent.
  const nlohmann::json& section(const std::string& key) const;
};

void to_json(nlohmann::json& j, const Manifest& m);
// UserError naming path for a wrong format, an unknown version, a missing field or a wrong type.
Manifest manifest_from_json(const nlohmann::json& j, const std::string& path);

// Reads and checks <dir>/manifest.json: its own CRC-32 ("manifest_crc32", over the
// rest of its content), then the schema.
Manifest read_manifest(const std::string& dir);
// Writes path (fsynced).
void write_manifest(const std::string& path, const Manifest& m);

}  // namespace moeprune
