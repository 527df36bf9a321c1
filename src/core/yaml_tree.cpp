#include "core/yaml_tree.h"

#include <algorithm>
#include <set>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace moeprune {
namespace fs = std::filesystem;

std::string key_text(const YAML::Node& key, const std::string& where) {
  require(key.IsScalar(), concat("config: ", where.empty() ? "<top level>" : where,
                                 " has a key that is not a plain name (expected keys like 'top_k')"));
  return key.Scalar();
}

std::string join_key(const std::string& prefix, const std::string& key) {
  return prefix.empty() ? key : prefix + "." + key;
}

void apply_override(YAML::Node& root, const std::string& ov) {
  const auto eq = ov.find('=');
  require(eq != std::string::npos && eq > 0,
          concat("--set '", ov, "': expected key=value, for example model.moe.top_k=1"));
  const std::string key = ov.substr(0, eq);
  YAML::Node value;
  try {
    value = YAML::Load(ov.substr(eq + 1));
  } catch (const YAML::Exception& e) {
    throw UserError(concat("--set '", ov, "': value is not valid YAML (", e.msg, ")"));
  }
  // Walk with fresh handles: yaml-cpp node assignment rebinds, so keep a chain.
  std::vector<std::string> parts;
  std::stringstream ss(key);
  for (std::string p; std::getline(ss, p, '.');) {
    require(!p.empty(), concat("--set '", ov, "': empty component in key '", key, "'"));
    parts.push_back(p);
  }
  std::vector<YAML::Node> chain{root};
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    YAML::Node next = chain.back()[parts[i]];
    if (!next || next.IsNull()) {
      chain.back()[parts[i]] = YAML::Node(YAML::NodeType::Map);
      next = chain.back()[parts[i]];
    }
    require(next.IsMap(), concat("--set '", ov, "': '", parts[i], "' is not a mapping"));
    chain.push_back(next);
  }
  chain.back()[parts.back()] = value;
}

namespace {
// Marks every key path under node as coming from file.
void mark(const YAML::Node& node, const std::string& path, const std::string& file, Origins& origins) {
  origins[path] = file;
  if (!node.IsMap()) return;
  for (const auto& kv : node) mark(kv.second, join_key(path, key_text(kv.first, path)), file, origins);
}

// Deep-merges src into dst: maps key by key, anything else replaces.
void merge(YAML::Node dst, const YAML::Node& src, const std::string& prefix, const std::string& file,
           Origins& origins) {
  for (const auto& kv : src) {
    const std::string key = key_text(kv.first, prefix);
    const std::string path = join_key(prefix, key);
    YAML::Node d = dst[key];
    if (kv.second.IsMap() && d.IsDefined() && d.IsMap()) {
      merge(d, kv.second, path, file, origins);
    } else {
      dst[key] = YAML::Clone(kv.second);
      mark(kv.second, path, file, origins);
    }
  }
}

}  // namespace

namespace {
// yaml-cpp keeps every pair of a mapping, and node[key] answers the first: a repeated
// key would silently lose its later value.
void require_unique_keys(const YAML::Node& node, const std::string& path, const std::string& name) {
  if (node.IsSequence())
    for (const auto& item : node) require_unique_keys(item, path, name);
  if (!node.IsMap()) return;
  std::set<std::string> seen;
  for (const auto& kv : node) {
    const std::string key = key_text(kv.first, path);
    require(seen.insert(key).second,
            concat("config ", name, ": key '", join_key(path, key), "' appears twice (expected each key once)"));
    require_unique_keys(kv.second, join_key(path, key), name);
  }
}
}  // namespace

YAML::Node load_text(const std::string& text, const std::string& name, bool file) {
  std::vector<YAML::Node> docs;
  try {
    docs = YAML::LoadAll(text);
  } catch (const YAML::Exception& e) {
    throw UserError(concat("config ", name, ": not valid YAML at line ", e.mark.line + 1, ": ", e.msg));
  }
  require(docs.size() <= 1, concat("config ", name, ": ", docs.size(),
                                   " YAML documents (separated by ---); expected one"));
  YAML::Node root = docs.empty() ? YAML::Node() : docs.front();
  require(!file || (root && !root.IsNull()),
          concat("config ", name, ": no settings in it (empty or only comments); expected a mapping of sections "
                 "(model:, data:, ...), or no --config for the embedded default"));
  if (!root || root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
  require(root.IsMap(), concat("config ", name, ": expected a mapping of sections (model:, data:, ...) at the top"));
  require_unique_keys(root, "", name);
  return root;
}

std::string read_file(const std::string& path) {
  // Only regular files: a directory, a FIFO (which would block), /dev/null or
  // /dev/zero (endless) are refused before anything is read.
  std::error_code ec;
  const auto st = fs::status(path, ec);
  require(!ec && fs::exists(st), concat("config: cannot open '", path, "' (no such file; expected a readable YAML file)"));
  require(!fs::is_directory(st), concat("config: '", path, "' is a directory (expected a readable YAML file)"));
  require(fs::is_regular_file(st), concat("config: '", path, "' is not a regular file (expected a readable YAML file)"));
  constexpr std::uintmax_t kMaxBytes = 16u << 20;
  const std::uintmax_t size = fs::file_size(path, ec);
  require(!ec && size <= kMaxBytes,
          concat("config: '", path, "' is ", ec ? 0 : size, " bytes (expected a YAML file of at most 16 MiB)"));
  std::ifstream in(path);
  require(in.good(), concat("config: cannot open '", path, "' (expected a readable YAML file)"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// root with its `base:` files merged underneath it. dir: where relative bases are
// found. chain: the files being read (cycle detection).
YAML::Node resolve_bases(YAML::Node root, const std::string& name, const fs::path& dir,
                         std::vector<std::string>& chain, Origins& origins) {
  YAML::Node base = root["base"];
  if (!base.IsDefined() || base.IsNull()) {
    root.remove("base");
    return root;
  }
  std::vector<std::string> bases;
  if (base.IsScalar()) bases.push_back(base.Scalar());
  else if (base.IsSequence())
    for (const auto& b : base) {
      require(b.IsScalar(), concat("config ", name, ": base must be a file name or a list of file names"));
      bases.push_back(b.Scalar());
    }
  else throw UserError(concat("config ", name, ": base must be a file name or a list of file names"));
  YAML::Node merged(YAML::NodeType::Map);
  for (const std::string& b : bases) {
    const fs::path path = fs::path(b).is_absolute() ? fs::path(b) : dir / b;
    const std::string canon = fs::weakly_canonical(path).string();
    if (std::find(chain.begin(), chain.end(), canon) != chain.end()) {
      std::string cycle;
      for (const auto& c : chain) cycle += c + " -> ";
      throw UserError(concat("config: base files form a cycle: ", cycle, canon));
    }
    require(fs::exists(path), concat("config ", name, ": base '", b, "' not found (looked for '", path.string(),
                                     "'; bases are relative to the file that names them)"));
    chain.push_back(canon);
    YAML::Node loaded =
        resolve_bases(load_text(read_file(path.string()), path.string(), true), path.string(), path.parent_path(), chain,
                      origins);
    chain.pop_back();
    merge(merged, loaded, "", path.string(), origins);
  }
  root.remove("base");
  Origins own;  // keys the file sets itself are its own, not a base's
  merge(merged, root, "", name, own);
  for (const auto& [path, file] : own) origins.erase(path);
  return merged;
}

// A canonical text of a YAML tree: maps with sorted keys, scalars quoted. Equal
// settings give equal text whatever the key order or the yaml-cpp version.
std::string canonical(const YAML::Node& n) {
  if (!n.IsDefined() || n.IsNull()) return "~";
  std::string s;
  if (n.IsScalar()) {
    s.push_back('"');
    for (char c : n.Scalar()) {
      if (c == '"' || c == '\\') s.push_back('\\');
      s.push_back(c);
    }
    s.push_back('"');
    return s;
  }
  if (n.IsSequence()) {
    s.push_back('[');
    for (const auto& item : n) {
      if (s.size() > 1) s.push_back(',');
      s.append(canonical(item));
    }
    s.push_back(']');
    return s;
  }
  std::vector<std::pair<std::string, std::string>> items;
  for (const auto& kv : n) items.emplace_back(kv.first.Scalar(), canonical(kv.second));
  std::sort(items.begin(), items.end());
  s.push_back('{');
  for (const auto& [k, v] : items) {
    if (s.size() > 1) s.push_back(',');
    s.append(k).append(":").append(v);
  }
  s.push_back('}');
  return s;
}

}  // namespace moeprune
