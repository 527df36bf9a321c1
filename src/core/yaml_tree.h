// YAML trees of job configs (internal to core's config reader): `base:`
// inheritance with deep merging, "--set" overrides, and a canonical text for
// fingerprints.
#pragma once
#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace moeprune {

// Which file each key path ("model.moe.top_k") was last set by, when bases are involved.
using Origins = std::map<std::string, std::string>;

// A mapping key as text; UserError for keys that are not plain scalars.
std::string key_text(const YAML::Node& key, const std::string& where);
std::string join_key(const std::string& prefix, const std::string& key);

// Applies "a.b.c=value" (value parsed as YAML), creating maps on the way.
void apply_override(YAML::Node& root, const std::string& ov);
// Parses text (a mapping at the top; empty = {}); name is used in messages.
// file: the text is a file's (an empty one, or one of comments only, is refused; an
// empty text is no settings).
YAML::Node load_text(const std::string& text, const std::string& name, bool file = false);
// The whole file; UserError for a directory or an unreadable file.
std::string read_file(const std::string& path);
// root with its `base:` files merged underneath it (recursively; later bases
// override earlier ones, root's own keys override all). dir: where relative bases
// are found. chain: canonical paths of the files being read (cycle detection).
YAML::Node resolve_bases(YAML::Node root, const std::string& name, const std::filesystem::path& dir,
                         std::vector<std::string>& chain, Origins& origins);
// Maps with sorted keys, scalars quoted: equal settings give equal text whatever
// the key order or the yaml-cpp version.
std::string canonical(const YAML::Node& n);

}  // namespace moeprune
