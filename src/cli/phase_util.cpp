#include "cli/phase_util.h"

#include "core/log.h"

namespace moeprune {

PhaseData phase_data(const JobConfig& cfg, const PhaseConfig& phase, const std::string& name) {
  std::shared_ptr<const Dataset> train = load_dataset(cfg, "train");
  std::shared_ptr<const Dataset> test = load_dataset(cfg, "test");
  PhaseData d{make_split(train, phase, name, "train", cfg.data.val_fraction),
              make_split(train, phase, name, "val", cfg.data.val_fraction),
              make_split(test, phase, name, "test", cfg.data.val_fraction)};
  log::info(concat(name, " data: ", train->name, " classes ", d.train.num_labels, " labels; train ", d.train.size(),
                   ", val ", d.val.size(), ", test ", d.test.size(), " examples"));
  return d;
}

LoaderOptions loader_options(const JobConfig& cfg, const World& world, int64_t batch, bool train,
                             uint64_t seed) {
  LoaderOptions o;
  o.global_batch = batch;
  o.rank = world.rank();
  o.world = world.size();
  o.seed = seed;
  o.train = train;
  o.augment = cfg.data.augment;
  o.image_size = cfg.model.image_size;
  o.channels = cfg.model.channels;
  o.prefetch = cfg.data.prefetch;
  o.device = world.device();
  return o;
}

}  // namespace moeprune
