// moeprune command line: parses the subcommand and config on every rank, agrees
// across ranks that the input is valid, then runs the subcommand.
#include <cstdio>

#include "cli/commands.h"
#include "core/error.h"
#include "core/log.h"
#include "pipeline/job.h"

using namespace moeprune;

int main(int argc, char** argv) {
  std::unique_ptr<World> world;
  try {
    world = std::make_unique<World>(&argc, &argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moeprune: cannot start: %s\n", e.what());
    return kExitUserError;
  }

  CLI::App app{
      "moeprune: expert-parallel fine-tuning, router-based expert pruning and rebalancing of V-MoE / E3-MoE\n"
      "models over MPI (CPU) and NCCL (GPU). Launch with mpirun; every rank runs the same command.\n"
      "Without --config the embedded default (configs/vmoe-tiny.yaml) is used."};
  Args args;
  const Commands cmd = define_commands(app, args);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // Every rank parses the same arguments: each exits the same way, no collective pending.
    const int rc = world->rank() == 0 ? app.exit(e) : e.get_exit_code();
    return rc == 0 ? kExitOk : kExitUserError;
  }
  log::init(world->rank(), world->size(), args.verbose);
  if (*cmd.ckpt && !is_collective_ckpt_action(args.ckpt_action)) {
    if (world->rank() != 0) return kExitOk;
    try {
      return cmd_ckpt(args);
    } catch (const UserError& e) {
      log::error(e.what());
      return kExitUserError;
    } catch (const nlohmann::json::exception& e) {  // a field of a wrong type in what was read
      log::error(concat("checkpoint: a manifest or state field has a wrong type or is missing (", e.what(), ")"));
      return kExitUserError;
    }
  }

  // Parse and validate on every rank, then agree: an error anywhere ends every
  // rank with exit code 2 and the message on each rank that saw it.
  JobConfig cfg;
  std::string error;
  int expert_parallel = 1;
  try {
    cfg = parse_config(args.config_path, args.overrides);
    expert_parallel = validate_world(cfg, world->size());
  } catch (const UserError& e) {
    error = e.what();
  }
  if (!world->all_ok(error.empty())) {
    log::error(error.empty() ? std::string("another rank rejected the input") : error);
    return kExitUserError;
  }
  world->set_mesh(expert_parallel, cfg.parallel.grad_reduce == GradReduce::Overlap);
  world->apply_runtime(cfg.runtime);
  install_stop_signals();

  return run_ranks(*world, [&](World& w) {
    if (*cmd.forward) return cmd_forward(w, cfg);
    if (*cmd.predict) return cmd_predict(w, cfg, args);
    if (*cmd.ckpt) return cmd_ckpt_vmoe(w, cfg, args);
    if (*cmd.run) return cmd_run(w, cfg, args);
    for (const auto& [phase, sub] : cmd.phases)
      if (*sub) return cmd_phase(w, cfg, phase, args);
    return kExitOk;
  });
}
