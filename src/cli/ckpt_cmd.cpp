// moeprune ckpt inspect|verify|export: look into a sharded checkpoint from one process.
#include <cstdio>
#include <filesystem>

#include "ckpt/checkpoint.h"
#include "cli/commands.h"
#include "core/error.h"

namespace moeprune {

int cmd_ckpt(const std::string& action, const std::string& dir_in, const std::string& out) {
  std::string dir = dir_in;
  // A checkpoint root (with a "latest" pointer) stands for its latest checkpoint.
  if (!std::filesystem::exists(dir + "/manifest.json") && std::filesystem::exists(dir + "/latest"))
    dir = latest_checkpoint(dir);
  if (action == "inspect") {
    std::printf("%s", inspect_checkpoint(dir).c_str());
  } else if (action == "verify") {
    const Manifest m = read_manifest(dir);
    verify_files(m);
    int64_t bytes = 0;
    for (const auto& f : m.files) bytes += f.bytes;
    std::printf("checkpoint %s: OK (%zu files, %lld bytes, sizes and CRC-32 match the manifest)\n", dir.c_str(),
                m.files.size(), static_cast<long long>(bytes));
  } else {
    require(!out.empty(), "ckpt export: give the output file, e.g. moeprune ckpt export DIR model.safetensors");
    export_checkpoint(dir, out);
    std::printf("exported %s to %s\n", dir.c_str(), out.c_str());
  }
  std::fflush(stdout);
  return kExitOk;
}

}  // namespace moeprune
