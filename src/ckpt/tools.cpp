#include "ckpt/tools.h"

#include <algorithm>
#include <memory>
#include <sstream>

#include "ckpt/manifest.h"
#include "ckpt/store.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "model/model_state.h"

namespace moeprune {
using json = nlohmann::json;

namespace {
// The small fields of a state section on one line: numbers, booleans, short strings
// and short lists of them.
std::string small_fields(const json& section) {
  std::string out;
  auto small = [](const json& v) {
    if (v.is_string()) return v.get<std::string>().size() <= 40;
    return v.is_number() || v.is_boolean();
  };
  for (auto it = section.begin(); it != section.end(); ++it) {
    const json& v = it.value();
    const bool list = v.is_array() && v.size() <= 16 && std::all_of(v.begin(), v.end(), small);
    if (!small(v) && !list) continue;
    out += concat(out.empty() ? "" : ", ", it.key(), " ", v.is_string() ? v.get<std::string>() : v.dump());
  }
  return out;
}
}  // namespace

std::string inspect_checkpoint(const std::string& dir_in) {
  const Manifest m = read_manifest(resolve_checkpoint(dir_in));
  std::ostringstream o;
  int64_t total = 0;
  for (const auto& f : m.files) total += f.bytes;
  o << "checkpoint " << m.dir << "\n"
    << "  format version " << m.version << ", phase " << m.phase << ", step " << m.step << ", saved on "
    << m.world_size << " ranks"
    << (m.expert_parallel != m.world_size
            ? concat(" (", m.world_size / m.expert_parallel, " expert-data-parallel groups x ", m.expert_parallel,
                     " expert-parallel; experts from group 0)")
            : std::string())
    << "\n";
  for (auto it = m.state.begin(); it != m.state.end(); ++it) o << "  " << it.key() << ": " << small_fields(it.value()) << "\n";
  std::map<int, std::map<int, std::vector<int>>> by_block;  // block -> rank -> ids
  for (const auto& s : m.shards)
    for (const auto& [block, ids] : s.experts) by_block[block][s.rank] = ids;
  for (const auto& [block, ranks] : by_block) {
    size_t n = 0;
    for (const auto& [r, ids] : ranks) n += ids.size();
    o << "  MoE block " << block << ": " << n << " experts";
    for (const auto& [r, ids] : ranks) {
      o << "  r" << r << ":[";
      for (size_t i = 0; i < ids.size(); ++i) o << (i ? "," : "") << ids[i];
      o << "]";
    }
    o << "\n";
  }
  o << "  files (" << total << " bytes):\n";
  for (const auto& f : m.files) o << "    " << f.name << "  " << f.bytes << " bytes  crc32 " << f.crc32 << "\n";
  return o.str();
}

std::string verify_checkpoint(const std::string& dir_in) {
  const Manifest m = read_manifest(resolve_checkpoint(dir_in));
  verify_files(m);
  // Every expert of the saved model in exactly one shard (read_manifest refused one
  // listed twice), on the rank the model's layout places it: the experts lost or
  // saved twice that expert-parallel checkpoints are known for.
  if (m.has_section("model")) {
    const ModelLayout layout = layout_from_json(m.section("model"), m.dir);
    std::map<std::pair<int, int>, int> listed;  // (block, id) -> rank of the shard listing it
    for (const auto& s : m.shards)
      for (const auto& [block, ids] : s.experts)
        for (int id : ids) listed[{block, id}] = s.rank;
    for (const auto& l : layout.layers) {
      for (size_t i = 0; i < l.experts.size(); ++i) {
        const auto it = listed.find({l.block, l.experts[i]});
        require(it != listed.end(), concat("checkpoint ", m.dir, ": expert ", l.experts[i], " of MoE block ", l.block,
                                           " is in the model but no shard lists it (lost at save)"));
        require(layout.world_size != m.expert_parallel || it->second == l.rank[i],
                concat("checkpoint ", m.dir, ": expert ", l.experts[i], " of MoE block ", l.block,
                       " is listed by the shard of rank ", it->second, ", the model places it on rank ", l.rank[i]));
      }
    }
    for (const auto& [key, rank] : listed) {
      bool known = false;
      for (const auto& l : layout.layers)
        known = known || (l.block == key.first && std::binary_search(l.experts.begin(), l.experts.end(), key.second));
      require(known, concat("checkpoint ", m.dir, ": the shard of rank ", rank, " lists expert ", key.second,
                            " of MoE block ", key.first, ", which the saved model does not have"));
    }
  }
  int64_t bytes = 0;
  for (const auto& f : m.files) bytes += f.bytes;
  return concat("checkpoint ", m.dir, ": OK (", m.files.size(), " files, ", bytes,
                " bytes, sizes and CRC-32 match the manifest",
                m.has_section("model") ? "; every expert of the model in one shard, on its rank" : "", ")");
}

void export_checkpoint(const std::string& dir_in, const std::string& out) {
  const Manifest m = read_manifest(resolve_checkpoint(dir_in));
  verify_files(m);
  NamedTensors all;
  SafetensorsFile dense(m.dir + "/" + kDenseFile);
  for (const auto& [name, e] : dense.entries()) all.emplace_back(name, dense.get(name));
  std::map<std::string, std::map<int, at::Tensor>> stacked;  // "blocks.1.moe.experts.w1" -> id -> tensor
  for (const auto& shard : m.shards) {
    SafetensorsFile s(m.dir + "/" + shard.file);
    for (const auto& [name, e] : s.entries()) {
      const auto [base, id] = parse_expert_tensor_name(name);
      require(id >= 0, concat("checkpoint: '", s.path(), "' holds '", name, "', which is not an expert tensor"));
      stacked[base][id] = s.get(name);
    }
  }
  for (auto& [name, by_id] : stacked) {
    std::vector<at::Tensor> parts;
    for (auto& [id, t] : by_id) parts.push_back(t);
    all.emplace_back(name, at::stack(parts));
  }
  std::map<std::string, std::string> meta{{"format", "moeprune-export-v1"}, {"phase", m.phase},
                                          {"step", std::to_string(m.step)}, {"config", m.config_yaml}};
  std::map<int, std::vector<int>> ids;
  for (const auto& shard : m.shards)
    for (const auto& [block, held] : shard.experts) ids[block].insert(ids[block].end(), held.begin(), held.end());
  for (auto& [block, v] : ids) {
    std::sort(v.begin(), v.end());
    std::string s;
    for (int e : v) s += concat(s.empty() ? "" : ",", e);
    meta[concat("experts.block", block)] = s;
  }
  write_safetensors(out, all, meta, true);
}

}  // namespace moeprune
