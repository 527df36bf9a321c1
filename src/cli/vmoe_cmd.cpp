// moeprune predict, moeprune ckpt import|export-vmoe: thin adapters over src/pipeline.
#include "cli/commands.h"
#include "pipeline/predict.h"
#include "pipeline/vmoe_io.h"

namespace moeprune {

bool is_collective_ckpt_action(const std::string& action) { return action == "import" || action == "export-vmoe"; }

int cmd_ckpt_vmoe(World& world, const JobConfig& cfg, const Args& args) {
  if (args.ckpt_action == "import")
    return import_vmoe(world, cfg, args.ckpt_dir, args.ckpt_out, /*arch_from_config=*/!args.config_path.empty());
  return export_vmoe(world, cfg, args.ckpt_dir, args.ckpt_out, args.ckpt_shards);
}

int cmd_predict(World& world, const JobConfig& cfg, const Args& args) {
  return run_predict(world, cfg,
                     PredictOptions{args.predict_init, args.predict_images, args.predict_out, args.predict_ensemble_out});
}

}  // namespace moeprune
