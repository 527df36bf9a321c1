// The subcommands and options of moeprune, with their help texts.
#include "cli/commands.h"

namespace moeprune {
namespace {

// What `moeprune <phase> --help` says beyond the phase table's input and output.
std::string phase_help(Phase p) {
  switch (p) {
    case Phase::Pretrain:
      return "Train the source task (config section `pretrain`) from scratch.\n"
             "Example: launch/mpirun.sh -np 2 build/moeprune pretrain --config configs/vmoe-tiny.yaml";
    case Phase::Finetune:
      return "Fine-tune on the downstream task (section `finetune`), recording each expert's router-weight\n"
             "change and load. Checkpoints every checkpoint.every steps and on SIGTERM/SIGUSR1 (then exit code 75).\n"
             "Example: launch/mpirun.sh -np 2 build/moeprune finetune --set finetune.steps=200 --resume auto";
    case Phase::Prune:
      return "Load a fine-tuned sharded checkpoint (any number of ranks), calibrate, score every expert by\n"
             "prune.criterion, prune globally or per layer, re-place the survivors for even load, evaluate,\n"
             "then re-fine-tune when refinetune.enabled.\n"
             "Example: launch/mpirun.sh -np 2 build/moeprune prune --set prune.ratio=0.5 --from runs/vmoe-tiny/checkpoints";
    case Phase::Refinetune:
      return "Re-fine-tune the pruned model of the latest prune checkpoint (section refinetune: SEER-MoE\n"
             "stage 2 with router_entropy_weight; evaluation with prune.eval_top_k).";
  }
  return "";
}

}  // namespace

Commands define_commands(CLI::App& app, Args& a) {
  app.require_subcommand(1);
  app.fallthrough();  // global options may follow the subcommand
  app.add_option("-c,--config", a.config_path, "YAML job config (default: embedded vmoe-tiny)");
  app.add_option("--set", a.overrides, "Override a config key, e.g. --set model.moe.top_k=1 (repeatable)");
  app.add_flag("-v,--verbose", a.verbose, "Debug logging on rank 0");
  Commands c;
  c.forward = app.add_subcommand(
      "forward",
      "Smoke test of the expert-parallel model: build it with the config's seed, run one forward and\n"
      "backward pass on a fixed synthetic batch, print per-expert rows, the loss and checksums of outputs\n"
      "and gradients. The figures are the same for any number of ranks.\n"
      "Example: mpirun -np 4 build/moeprune forward --config configs/vmoe-tiny.yaml");
  for (const PhaseInfo& info : phase_table()) {
    const std::string help = phase_help(info.phase) + "\nStarts from: " + std::string(info.input) +
                             ".\nLeaves: " + std::string(info.output) + ".";
    CLI::App* sub = app.add_subcommand(std::string(info.name), help);
    if (info.phase == Phase::Prune) {
      sub->add_option("--from", a.prune_from, "fine-tuning checkpoint or checkpoint root (default: checkpoint.dir)");
    } else {
      sub->add_option("--resume", a.resume, "auto (latest checkpoint of this phase, if any) | DIR | none");
    }
    if (info.phase == Phase::Pretrain)
      sub->add_flag("--skip-if-done", a.skip_if_done,
                    "Reuse an existing pretrained model made with the same seed, model, data and pretrain settings");
    c.phases.emplace_back(info.phase, sub);
  }
  c.run = app.add_subcommand(
      "run",
      "The whole job in one mpirun: pretrain (when configured and not already done with the same\n"
      "settings) -> fine-tune recording router history -> calibrate -> prune -> rebalance ->\n"
      "re-fine-tune (when refinetune.enabled) -> evaluate, with sharded checkpoints throughout.\n"
      "After preemption (exit code 75) rerun the same command with --resume auto, on any number of ranks.\n"
      "Example: launch/mpirun.sh -np 2 build/moeprune run --config configs/vmoe-tiny.yaml --resume auto");
  c.run->add_option("--resume", a.resume, "auto (continue at the phase and step of the latest checkpoint) | none");
  c.ckpt = app.add_subcommand(
      "ckpt",
      "Sharded checkpoints (one process, no mpirun needed):\n"
      "  inspect DIR       phase, step, world size, state sections, experts per layer and their ranks, files\n"
      "                    (DIR a vmoe prefix: its arrays and the data files it needs, present or missing)\n"
      "  verify DIR        sizes and CRC-32 of every file against the manifest\n"
      "  export DIR OUT    every tensor in one safetensors file (experts stacked per layer)\n"
      "DIR may be a checkpoint or a checkpoint root (its latest checkpoint).\n"
      "vmoe checkpoints (google-research/vmoe's .index + .data-* files; any number of ranks, each reads its experts):\n"
      "  import PREFIX OUT          a vmoe checkpoint as a moeprune model file; prints every array it read. The\n"
      "                             architecture comes from the checkpoint, or with --config must match it\n"
      "  export-vmoe SRC PREFIX     a model (checkpoint, root, model file, vmoe prefix, or `random`: the\n"
      "                             config's model freshly initialised) as a vmoe checkpoint\n"
      "                             [--shards N data files]\n"
      "Example: build/moeprune ckpt inspect runs/vmoe-tiny/checkpoints\n"
      "         build/moeprune ckpt import data/pretrained/vmoe_b16_imagenet21k_randaug_strong b16.safetensors");
  c.ckpt->add_option("action", a.ckpt_action, "inspect | verify | export | import | export-vmoe")
      ->required()
      ->check(CLI::IsMember({"inspect", "verify", "export", "import", "export-vmoe"}));
  c.ckpt->add_option("dir", a.ckpt_dir, "checkpoint directory or root (import: vmoe prefix; export-vmoe: model)")
      ->required();
  c.ckpt->add_option("out", a.ckpt_out, "output file (export, import) or prefix (export-vmoe)");
  c.ckpt->add_option("--shards", a.ckpt_shards, "export-vmoe: number of data files (default 1)");
  c.predict = app.add_subcommand(
      "predict",
      "Run a model in eval mode (no router noise) on images from a NumPy .npy array and write the logits\n"
      "as .npy (E3: one row per image and member, row b*M+m, plus the ensemble log-probabilities).\n"
      "The model: a vmoe checkpoint prefix (architecture from the checkpoint), a sharded checkpoint or\n"
      "root (as saved), or a model file (the config's model). Routing settings (top_k, capacity_factor,\n"
      "group_size) come from the config and --set. Images: uint8 or float32, NHWC (as vmoe stores them) or\n"
      "NCHW; uint8 is scaled as the model was trained (vmoe: [-1, 1]), float is taken as given.\n"
      "Example: launch/mpirun.sh -np 2 build/moeprune predict --init ckpt --images x.npy --out logits.npy \\\n"
      "           --set model.moe.group_size=2 --set model.moe.capacity_factor=1.5");
  c.predict->add_option("--init", a.predict_init, "vmoe prefix, checkpoint (root) or model file")->required();
  c.predict->add_option("--images", a.predict_images, "images .npy (uint8 or float32, NHWC or NCHW)")->required();
  c.predict->add_option("--out", a.predict_out, "logits .npy (default: <images>.logits.npy)");
  c.predict->add_option("--ensemble-out", a.predict_ensemble_out, "E3: ensemble log-probabilities .npy");
  return c;
}

}  // namespace moeprune
