#include "ckpt/manifest.h"

#include <filesystem>
#include <fstream>

#include "ckpt/store.h"
#include "core/error.h"

namespace moeprune {
using json = nlohmann::json;

const json& Manifest::section(const std::string& key) const {
  require(has_section(key), concat("checkpoint ", dir, " (", phase, ", step ", step, ") holds no '", key,
                                   "' state"));
  return state.at(key);
}

bool Manifest::lists(const std::string& name) const {
  for (const auto& f : files)
    if (f.name == name) return true;
  return false;
}

void to_json(json& j, const Manifest& m) {
  json shards = json::array();
  for (const auto& s : m.shards) {
    json experts = json::object();
    for (const auto& [block, ids] : s.experts) experts[std::to_string(block)] = ids;
    shards.push_back({{"file", s.file}, {"rank", s.rank}, {"experts", experts}});
  }
  json files = json::array();
  for (const auto& f : m.files) files.push_back({{"name", f.name}, {"bytes", f.bytes}, {"crc32", f.crc32}});
  j = {{"format", kCheckpointFormat}, {"version", m.version}, {"phase", m.phase},   {"step", m.step},
       {"world_size", m.world_size},  {"expert_parallel", m.expert_parallel > 0 ? m.expert_parallel : m.world_size}, {"config", m.config_yaml},
       {"state", m.state}, {"shards", shards}, {"files", files}};
}

namespace {
// Format and version first: a manifest of another version gets the message that says so.
void require_format_and_version(const json& j, const std::string& path) {
  require(j.is_object(), concat("checkpoint: '", path, "' is not a JSON object"));
  const json format = j.value("format", json());
  require(format.is_string() && format.get<std::string>() == kCheckpointFormat,
          concat("checkpoint: '", path, "' has format ", format.dump(), ", expected '", kCheckpointFormat, "'"));
  const json version = j.value("version", json());
  require(version.is_number_integer() && version.get<int>() == kCheckpointVersion,
          concat("checkpoint: '", path, "' has version ", version.dump(), ", this moeprune reads version ",
                 kCheckpointVersion,
                 version.is_number_integer() && version.get<int>() < kCheckpointVersion
                     ? " (written by an older moeprune: rerun that phase, or read it with the moeprune that wrote it)"
                     : ""));
}
}  // namespace

Manifest manifest_from_json(const json& j, const std::string& path) {
  require_format_and_version(j, path);
  const json version = j.at("version");
  Manifest m;
  try {
    m.version = version.get<int>();
    m.phase = j.at("phase").get<std::string>();
    m.step = j.at("step").get<int64_t>();
    m.world_size = j.at("world_size").get<int>();
    m.expert_parallel = j.contains("expert_parallel") ? j.at("expert_parallel").get<int>() : m.world_size;
    if (m.expert_parallel == 0) m.expert_parallel = m.world_size;
    m.config_yaml = j.at("config").get<std::string>();
    m.state = j.at("state");
    require(m.state.is_object(), concat("checkpoint: '", path, "': 'state' must be an object"));
    for (const auto& s : j.at("shards")) {
      ExpertShard shard{s.at("file").get<std::string>(), s.at("rank").get<int>(), {}};
      for (auto it = s.at("experts").begin(); it != s.at("experts").end(); ++it)
        shard.experts[std::stoi(it.key())] = it.value().get<std::vector<int>>();
      m.shards.push_back(std::move(shard));
    }
    for (const auto& f : j.at("files"))
      m.files.push_back(CheckpointFile{f.at("name").get<std::string>(), f.at("bytes").get<int64_t>(),
                                       f.at("crc32").get<uint32_t>()});
  } catch (const json::exception& e) {
    throw UserError(concat("checkpoint: '", path, "' lacks a field or has a wrong type: ", e.what()));
  } catch (const std::logic_error&) {  // std::stoi of a block key
    throw UserError(concat("checkpoint: '", path, "' names an MoE block that is not a number"));
  }
  // Ranges and relations: every rank once, every file a rank needs listed.
  const auto bad = [&](const std::string& what) { return concat("checkpoint: '", path, "': ", what); };
  require(m.step >= 0, bad(concat("step ", m.step, ", expected >= 0")));
  require(m.world_size >= 1, bad(concat("world_size ", m.world_size, ", expected >= 1")));
  require(m.expert_parallel >= 1 && m.world_size % m.expert_parallel == 0,
          bad(concat("expert_parallel ", m.expert_parallel, " for world_size ", m.world_size,
                     ", expected a divisor of world_size")));
  require(static_cast<int>(m.shards.size()) == m.expert_parallel,
          bad(concat(m.shards.size(), " shards for expert_parallel ", m.expert_parallel,
                     ", expected one per rank of an expert-parallel group")));
  std::vector<bool> seen(static_cast<size_t>(m.expert_parallel), false);
  std::map<std::pair<int, int>, int> lister;  // (block, id) -> the rank whose shard lists it
  for (const auto& s : m.shards) {
    require(s.rank >= 0 && s.rank < m.expert_parallel && !seen[static_cast<size_t>(s.rank)],
            bad(concat("shard of rank ", s.rank, ", expected each rank of 0..", m.expert_parallel - 1, " once")));
    seen[static_cast<size_t>(s.rank)] = true;
    require(m.lists(s.file), bad(concat("shard file '", s.file, "' of rank ", s.rank, " is not in 'files'")));
    for (const auto& [block, ids] : s.experts) {
      require(block >= 0, bad(concat("MoE block ", block, ", expected >= 0")));
      for (int id : ids) {
        require(id >= 0, bad(concat("expert id ", id, " in block ", block, ", expected >= 0")));
        // An expert saved twice (or by two ranks) would be loaded from whichever came last.
        const auto [it, fresh] = lister.emplace(std::make_pair(block, id), s.rank);
        require(fresh, bad(it->second == s.rank
                               ? concat("expert ", id, " of MoE block ", block, " is listed twice by the shard of rank ",
                                        s.rank, ", expected exactly once")
                               : concat("expert ", id, " of MoE block ", block, " is listed by the shards of ranks ",
                                        it->second, " and ", s.rank, ", expected exactly once")));
      }
    }
  }
  for (const auto& f : m.files)
    require(f.bytes >= 0 && !f.name.empty() && f.name.find('/') == std::string::npos,
            bad(concat("file entry '", f.name, "' (", f.bytes, " bytes), expected a plain file name and a size")));
  return m;
}

Manifest read_manifest(const std::string& dir) {
  const std::string path = dir + "/manifest.json";
  require(std::filesystem::exists(path),
          concat("checkpoint: '", path, "' does not exist (expected a checkpoint directory)"));
  std::ifstream in(path, std::ios::binary);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  json j;
  try {
    j = json::parse(text);  // the whole file: anything after the object is corruption too
  } catch (const std::exception& e) {
    throw UserError(concat("checkpoint: '", path, "' is not valid JSON (", e.what(), ")"));
  }
  // The manifest's own checksum before its content: an edited step, a flipped byte
  // in a state section or a shortened list would otherwise pass as a valid checkpoint.
  require_format_and_version(j, path);
  require(j.is_object() && j.contains("manifest_crc32") && j["manifest_crc32"].is_number_unsigned(),
          concat("checkpoint: '", path, "' has no manifest_crc32 (written by an older moeprune, or damaged)"));
  const auto stored = j["manifest_crc32"].get<uint64_t>();
  json body = j;
  body.erase("manifest_crc32");
  const uint32_t actual = text_crc32(body.dump());
  require(stored == actual, concat("checkpoint: '", path, "' has CRC-32 ", actual, ", its manifest_crc32 says ",
                                   stored, " (the manifest was edited or is corrupt: not loaded)"));
  Manifest m = manifest_from_json(body, path);
  m.dir = dir;
  return m;
}

void write_manifest(const std::string& path, const Manifest& m) {
  {
    json j = m;
    j["manifest_crc32"] = text_crc32(j.dump());
    std::ofstream out(path);
    out << j.dump(1) << "\n";
    out.flush();
    require(out.good(), concat("checkpoint: cannot write '", path, "'"));
  }
  fsync_path(path);
}

}  // namespace moeprune
