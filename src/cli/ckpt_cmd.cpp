// moeprune ckpt inspect|verify|export: look into a sharded checkpoint from one process.
#include <cstdio>

#include "ckpt/tools.h"
#include "ckpt/vmoe_format.h"
#include "cli/commands.h"
#include "core/error.h"

namespace moeprune {

int cmd_ckpt(const Args& args) {
  if (args.ckpt_action == "inspect" && VmoeCheckpoint::is_prefix(args.ckpt_dir)) {
    std::printf("%s", describe_vmoe(VmoeCheckpoint(args.ckpt_dir)).c_str());
  } else if (args.ckpt_action == "inspect") {
    std::printf("%s", inspect_checkpoint(args.ckpt_dir).c_str());
  } else if (args.ckpt_action == "verify") {
    std::printf("%s\n", verify_checkpoint(args.ckpt_dir).c_str());
  } else {
    require(!args.ckpt_out.empty(), "ckpt export: give the output file, e.g. moeprune ckpt export DIR model.safetensors");
    export_checkpoint(args.ckpt_dir, args.ckpt_out);
    std::printf("exported %s to %s\n", args.ckpt_dir.c_str(), args.ckpt_out.c_str());
  }
  std::fflush(stdout);
  return kExitOk;
}

}  // namespace moeprune
