#include "ckpt/store.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "core/error.h"

namespace moeprune {
namespace fs = std::filesystem;

std::string expert_file(int rank) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "experts-r%05d.safetensors", rank);
  return buf;
}

std::string checkpoint_name(int64_t sequence, const std::string& phase, int64_t step) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "ckpt-%06lld-%s-step%08lld", static_cast<long long>(sequence), phase.c_str(),
                static_cast<long long>(step));
  return buf;
}

std::string expert_tensor_name(const std::string& stacked, int id) {
  const auto dot = stacked.rfind('.');
  return concat(stacked.substr(0, dot), ".e", id, stacked.substr(dot));
}

std::pair<std::string, int> parse_expert_tensor_name(const std::string& name) {
  const auto dot = name.rfind('.');
  if (dot == std::string::npos || dot == 0) return {name, -1};
  const auto prev = name.rfind('.', dot - 1);
  const size_t begin = prev == std::string::npos ? 0 : prev + 1;
  const std::string part = name.substr(begin, dot - begin);  // "e5"
  if (part.size() < 2 || part[0] != 'e' || part.size() > 10 ||
      !std::all_of(part.begin() + 1, part.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return {name, -1};
  const std::string stacked = prev == std::string::npos ? name.substr(dot + 1) : name.substr(0, prev) + name.substr(dot);
  return {stacked, std::stoi(part.substr(1))};
}

std::string latest_checkpoint(const std::string& root) {
  const std::string ptr = root + "/latest";
  if (!fs::exists(ptr)) return "";
  std::ifstream in(ptr);
  std::string name;
  in >> name;
  require(!name.empty() && fs::exists(root + "/" + name + "/manifest.json"),
          concat("checkpoint: '", ptr, "' names '", name, "', which is not a complete checkpoint"));
  return root + "/" + name;
}

std::string resolve_checkpoint(const std::string& dir) {
  if (fs::exists(dir + "/manifest.json")) return dir;
  if (fs::exists(dir + "/latest")) return latest_checkpoint(dir);
  const auto done = complete_checkpoints(dir);
  require(done.empty(), concat("checkpoint: '", dir, "' holds ", done.size(), " checkpoint(s) but no 'latest' pointer: "
                               "name one of them (the newest is '", dir, "/", done.empty() ? "" : done.back(), "')"));
  return dir;
}

std::vector<std::string> complete_checkpoints(const std::string& root) {
  std::vector<std::string> out;
  if (!fs::exists(root)) return out;
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string n = e.path().filename().string();
    if (n.rfind("ckpt-", 0) == 0 && fs::exists(e.path() / "manifest.json")) out.push_back(n);
  }
  std::sort(out.begin(), out.end());
  return out;
}

int64_t next_sequence(const std::string& root) {
  int64_t seq = 0;
  if (!fs::exists(root)) return 1;
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string n = e.path().filename().string();
    if (n.rfind("ckpt-", 0) == 0) seq = std::max<int64_t>(seq, std::atoll(n.c_str() + 5));
  }
  return seq + 1;
}

void publish(const std::string& root, const std::string& name, int keep) {
  {
    std::ofstream out(root + "/latest.tmp");
    out << name << "\n";
  }
  fsync_path(root + "/latest.tmp");
  fs::rename(root + "/latest.tmp", root + "/latest");
  fsync_path(root);
  // Retention counts within a phase: the newest `keep` checkpoints of the phase just
  // saved stay, and other phases' checkpoints are never collected here, so the last
  // checkpoint of a finished phase (what `prune --from` or a later phase reads) stays.
  const std::string phase = checkpoint_phase(name);
  std::vector<std::string> same;
  for (const auto& d : complete_checkpoints(root))
    if (checkpoint_phase(d) == phase) same.push_back(d);
  for (size_t i = 0; i + static_cast<size_t>(keep) < same.size(); ++i) fs::remove_all(root + "/" + same[i]);
}

std::string checkpoint_phase(const std::string& name) {
  // ckpt-<sequence>-<phase>-step<step>
  if (name.rfind("ckpt-", 0) != 0) return "";
  const auto dash = name.find('-', 5);
  const auto step = name.rfind("-step");
  if (dash == std::string::npos || step == std::string::npos || step <= dash + 1) return "";
  return name.substr(dash + 1, step - dash - 1);
}

void fsync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

uint32_t file_crc32(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  require(in.good(), concat("checkpoint: cannot read '", path, "'"));
  std::vector<char> buf(1 << 22);
  uLong crc = crc32(0L, Z_NULL, 0);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const auto n = in.gcount();
    if (n > 0) crc = crc32(crc, reinterpret_cast<const Bytef*>(buf.data()), static_cast<uInt>(n));
  }
  return static_cast<uint32_t>(crc);
}

uint32_t text_crc32(const std::string& text) {
  return static_cast<uint32_t>(crc32(crc32(0L, Z_NULL, 0), reinterpret_cast<const Bytef*>(text.data()),
                                     static_cast<uInt>(text.size())));
}

void verify_files(const Manifest& m, const std::vector<std::string>& names) {
  // A file the caller needs must be listed: an unlisted file would be read unchecked.
  for (const auto& n : names)
    require(m.lists(n),
            concat("checkpoint ", m.dir, ": file '", n, "' is not listed in its manifest (size and CRC-32 unknown: "
                   "not loaded)"));
  for (const auto& f : m.files) {
    if (!names.empty() && std::find(names.begin(), names.end(), f.name) == names.end()) continue;
    const std::string path = m.dir + "/" + f.name;
    require(fs::exists(path), concat("checkpoint: file '", path, "' listed in the manifest is missing"));
    const auto size = static_cast<int64_t>(fs::file_size(path));
    require(size == f.bytes, concat("checkpoint: '", path, "' has ", size, " bytes, the manifest says ", f.bytes,
                                    " (truncated or replaced)"));
    const uint32_t crc = file_crc32(path);
    require(crc == f.crc32, concat("checkpoint: '", path, "' has CRC-32 ", crc, ", the manifest says ", f.crc32,
                                   " (corrupt)"));
  }
}

}  // namespace moeprune
