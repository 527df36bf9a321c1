// Checkpoint faults in one process: a truncated shard, one flipped byte, a missing
// file and an unknown manifest version each give a clear error naming the file and
// leave the checkpoint untouched; an interrupted save (a leftover temporary
// directory) is ignored and the previous checkpoint stays the latest; only the
// newest `keep` checkpoints are kept; inspect and export work.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "ckpt/manifest.h"
#include "ckpt/reader.h"
#include "ckpt/store.h"
#include "ckpt/tools.h"
#include "ckpt/writer.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "model/model_state.h"
#include "prune/router_history.h"
#include "test_models.h"
#include "test_tmp.h"
#include "train/trainer.h"

namespace moeprune {
namespace {
namespace fs = std::filesystem;

ModelConfig tiny() { return test::small_vit(2, 4, 3); }

struct Fixture {
  SelfCommunicator comm;
  JobConfig job;
  VisionTransformer model{nullptr};
  std::unique_ptr<Optimizer> opt;
  test::TempDir tmp;
  std::string root;

  explicit Fixture(const std::string& name) : tmp("ckpt-" + name), root(tmp / "checkpoints") {
    job.model = tiny();
    at::manual_seed(0);
    model = VisionTransformer(job.model, default_placements(job.model, 1), comm, 0);
    PhaseConfig p;
    opt = std::make_unique<Optimizer>(p, param_slots(model));
  }
  std::string save(int64_t step, int keep = 3) {
    CheckpointWriter w(Comms{&comm, &comm}, root, keep, false);
    ModelState state(model);
    w.save({&state, opt.get()}, "finetune", step, job.resolved_yaml);
    return w.last_saved();
  }
  std::string load_error(const std::string& dir) {
    try {
      VisionTransformer other(job.model, default_placements(job.model, 1), comm, 1);
      ModelState state(other);
      load_checkpoint(read_manifest(dir), {&state});
    } catch (const UserError& e) {
      return e.what();
    }
    return "";
  }
};

std::string digest(const std::string& dir) {
  std::string d;
  for (const auto& e : fs::directory_iterator(dir))
    d += e.path().filename().string() + ":" + std::to_string(fs::file_size(e.path())) + ";";
  return d;
}

TEST(Checkpoint, TruncatedFlippedMissingAndUnknownVersion) {
  Fixture f("faults");
  const std::string dir = f.save(5);
  EXPECT_EQ(f.load_error(dir), "");
  const std::string shard = dir + "/experts-r00000.safetensors";
  const std::string backup = dir + "/../shard.bak";
  fs::copy_file(shard, backup, fs::copy_options::overwrite_existing);

  fs::resize_file(shard, fs::file_size(shard) - 100);
  std::string before = digest(dir);
  std::string e = f.load_error(dir);
  EXPECT_NE(e.find("experts-r00000.safetensors"), std::string::npos) << e;
  EXPECT_NE(e.find("truncated"), std::string::npos) << e;
  EXPECT_EQ(digest(dir), before) << "a failed load must not change the checkpoint";

  fs::copy_file(backup, shard, fs::copy_options::overwrite_existing);
  {
    std::fstream io(shard, std::ios::in | std::ios::out | std::ios::binary);
    io.seekg(-10, std::ios::end);
    char c = 0;
    io.get(c);
    io.seekp(-10, std::ios::end);
    io.put(static_cast<char>(c ^ 0x40));
  }
  e = f.load_error(dir);
  EXPECT_NE(e.find("corrupt"), std::string::npos) << e;

  fs::remove(shard);
  e = f.load_error(dir);
  EXPECT_NE(e.find("is missing"), std::string::npos) << e;
  fs::copy_file(backup, shard);
  EXPECT_EQ(f.load_error(dir), "");

  std::string text;
  {
    std::ifstream in(dir + "/manifest.json");
    text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  const std::string version = "\"version\": " + std::to_string(kCheckpointVersion);
  const auto pos = text.find(version);
  ASSERT_NE(pos, std::string::npos);
  std::string bad = text;
  bad.replace(pos, version.size(), "\"version\": 99");
  std::ofstream(dir + "/manifest.json") << bad;
  e = f.load_error(dir);
  EXPECT_NE(e.find("has version 99, this moeprune reads version " + std::to_string(kCheckpointVersion)),
            std::string::npos)
      << e;
}

// The manifest checks itself: an edited field, a flipped byte in a state section, or a
// shard dropped from the file list (checksum recomputed, as a careful forger would)
// is refused, never loaded.
TEST(Checkpoint, ManifestEditsAndUnlistedFilesAreRefused) {
  Fixture f("manifest");
  const std::string dir = f.save(10);
  ASSERT_EQ(f.load_error(dir), "");
  const std::string path = dir + "/manifest.json";
  nlohmann::json j;
  std::ifstream(path) >> j;
  const nlohmann::json original = j;
  auto write = [&](const nlohmann::json& m) { std::ofstream(path) << m.dump(1); };

  j["step"] = 17;
  write(j);
  std::string e = f.load_error(dir);
  EXPECT_NE(e.find("the manifest was edited or is corrupt"), std::string::npos) << e;

  j = original;
  j["state"]["optimizer"]["steps"] = 99;
  write(j);
  EXPECT_NE(f.load_error(dir).find("manifest was edited"), std::string::npos);

  // A shard missing from `files`, with a matching checksum.
  j = original;
  j.erase("manifest_crc32");
  nlohmann::json files = nlohmann::json::array();
  for (const auto& x : j["files"])
    if (x["name"] != "experts-r00000.safetensors") files.push_back(x);
  j["files"] = files;
  j["manifest_crc32"] = text_crc32(j.dump());
  write(j);
  e = f.load_error(dir);
  EXPECT_NE(e.find("experts-r00000.safetensors' of rank 0 is not in 'files'"), std::string::npos) << e;

  // Wrong JSON types: an error naming the file, not an abort.
  j = original;
  j["version"] = "3";
  write(j);
  EXPECT_NE(f.load_error(dir).find("has version \"3\""), std::string::npos);

  write(original);
  EXPECT_EQ(f.load_error(dir), "");
}

// Experts lost or saved twice (the expert-parallel checkpoint failure users of other
// systems report): a manifest listing an expert twice is refused on load and by
// verify; one that lists an expert the model does not have, or misses one, is refused
// by `ckpt verify` (and the missing one on load, by the rank that needs it).
TEST(Checkpoint, EveryExpertExactlyOnce) {
  Fixture f("experts-once");
  const std::string dir = f.save(10);
  EXPECT_NE(verify_checkpoint(dir).find("every expert of the model in one shard"), std::string::npos);
  const std::string path = dir + "/manifest.json";
  nlohmann::json j;
  std::ifstream(path) >> j;
  const nlohmann::json original = j;
  auto write_listing = [&](const std::vector<int>& ids) {
    nlohmann::json m = original;
    m.erase("manifest_crc32");
    m["shards"][0]["experts"]["1"] = ids;
    m["manifest_crc32"] = text_crc32(m.dump());
    std::ofstream(path) << m.dump(1);
  };
  auto verify_error = [&]() -> std::string {
    try {
      verify_checkpoint(dir);
    } catch (const UserError& e) {
      return e.what();
    }
    return "";
  };
  ASSERT_EQ(original["shards"][0]["experts"]["1"], nlohmann::json({0, 1, 2, 3}));

  write_listing({0, 1, 2, 3, 2});
  EXPECT_NE(verify_error().find("expert 2 of MoE block 1 is listed twice by the shard of rank 0"), std::string::npos)
      << verify_error();
  EXPECT_NE(f.load_error(dir).find("listed twice"), std::string::npos);

  write_listing({0, 1, 3});
  EXPECT_NE(verify_error().find("expert 2 of MoE block 1 is in the model but no shard lists it"), std::string::npos)
      << verify_error();
  EXPECT_NE(f.load_error(dir).find("no shard holds expert 2 of MoE block 1"), std::string::npos) << f.load_error(dir);

  write_listing({0, 1, 2, 3, 7});
  EXPECT_NE(verify_error().find("lists expert 7 of MoE block 1, which the saved model does not have"),
            std::string::npos)
      << verify_error();

  std::ofstream(path) << original.dump(1);
  EXPECT_EQ(verify_error(), "");
  EXPECT_EQ(f.load_error(dir), "");
}

// Seeded corruption: one byte of one of the checkpoint's files changed, or a file cut
// short, at random. Every such checkpoint must be refused with a UserError (never
// another exception), unless its data is unchanged (whitespace of the manifest); the
// original loads again afterwards.
TEST(Checkpoint, RandomCorruptionsAreNeverLoaded) {
  Fixture f("corrupt");
  const std::string dir = f.save(3);
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir)) files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  std::mt19937 rng(7);
  for (int trial = 0; trial < 60; ++trial) {
    const std::string path = files[rng() % files.size()];
    std::string bytes;
    {
      std::ifstream in(path, std::ios::binary);
      bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
    std::string bad = bytes;
    if (rng() % 5 == 0) {
      bad.resize(rng() % bytes.size());
    } else {
      const size_t at = rng() % bytes.size();
      bad[at] = static_cast<char>(bad[at] ^ static_cast<char>(1 + rng() % 255));
    }
    std::ofstream(path, std::ios::binary | std::ios::trunc) << bad;
    std::string e;
    try {
      e = f.load_error(dir);
    } catch (const std::exception& x) {
      ADD_FAILURE() << "trial " << trial << " (" << path << "): not a UserError: " << x.what();
    }
    if (e.empty()) {
      // Only a change that leaves the data as it was may load: whitespace between the
      // manifest's JSON tokens (its checksum covers the content, not the layout).
      const auto same_json = [&] {
        if (fs::path(path).filename() != "manifest.json") return false;
        const auto a = nlohmann::json::parse(bytes, nullptr, false), b = nlohmann::json::parse(bad, nullptr, false);
        return !b.is_discarded() && a == b;
      };
      size_t at = 0;
      while (at < bad.size() && at < bytes.size() && bad[at] == bytes[at]) ++at;
      EXPECT_TRUE(same_json()) << "trial " << trial << ": corrupted " << path << " was loaded (first change at byte "
                               << at << ": '" << bytes.substr(at > 30 ? at - 30 : 0, 60) << "' -> '"
                               << bad.substr(at > 30 ? at - 30 : 0, 60) << "')";
    }
    std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  }
  EXPECT_EQ(f.load_error(dir), "");
}

// A model layout whose placement names a rank outside the saved world (or experts out
// of order) is refused naming the checkpoint, not by the placement code later.
TEST(Checkpoint, LayoutOutOfRangeNamesTheCheckpoint) {
  const nlohmann::json good = {{"num_classes", 10}, {"pruned_routing", "drop"}, {"world_size", 2},
                               {"moe_layers", {{{"block", 1}, {"experts", {0, 1, 2, 3}}, {"rank", {0, 0, 1, 1}}}}}};
  EXPECT_NO_THROW(layout_from_json(good, "ckpt-x"));
  auto refused = [&](nlohmann::json j, const std::string& msg) {
    try {
      layout_from_json(j, "runs/a/ckpt-000002");
      ADD_FAILURE() << "accepted: " << j.dump();
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find("runs/a/ckpt-000002: " + msg), std::string::npos) << e.what();
    }
  };
  nlohmann::json j = good;
  j["moe_layers"][0]["rank"] = {0, 0, 1, 4};
  refused(j, "MoE block 1 places expert 3 on rank 4, expected 0..1 (saved on 2 ranks)");
  j = good;
  j["moe_layers"][0]["experts"] = {0, 2, 2, 3};
  refused(j, "MoE block 1 lists experts out of order or twice");
  j = good;
  j["world_size"] = 0;
  refused(j, "model.world_size 0 must be >= 1");
  // Hot-expert replicas: the other copies' ranks, per expert.
  j = good;
  j["moe_layers"][0]["replicas"] = nlohmann::json::parse("[[1], [], [], [0]]");
  const ModelLayout with = layout_from_json(j, "ckpt-x");
  EXPECT_EQ(placements_of(with, 2)[0].expert_ranks(), (std::vector<std::vector<int>>{{0, 1}, {0}, {1}, {1, 0}}));
  EXPECT_FALSE(placements_of(with, 4)[0].has_replicas());  // another world size: contiguous, no replicas
  j["moe_layers"][0]["replicas"] = nlohmann::json::parse("[[1], []]");
  refused(j, "MoE block 1 lists replicas for 2 of its 4 experts");
  j["moe_layers"][0]["replicas"] = nlohmann::json::parse("[[0], [], [], []]");
  refused(j, "MoE block 1 places a replica of expert 0 on rank 0, expected a rank in 0..1 holding no other copy");
  j["moe_layers"][0]["replicas"] = nlohmann::json::parse("[[2], [], [], []]");
  refused(j, "MoE block 1 places a replica of expert 0 on rank 2");
}

TEST(Checkpoint, InterruptedSaveLeavesThePreviousLatest) {
  Fixture f("crash");
  const std::string first = f.save(1);
  // A save that died half way: its temporary directory, with a partial shard and no manifest.
  fs::create_directories(f.root + "/.tmp-ckpt-000002-finetune-step00000002");
  std::ofstream(f.root + "/.tmp-ckpt-000002-finetune-step00000002/experts-r00000.safetensors") << "partial";
  EXPECT_EQ(latest_checkpoint(f.root), first);
  EXPECT_EQ(f.load_error(latest_checkpoint(f.root)), "");
  // The next save succeeds beside the leftover and becomes the latest.
  const std::string second = f.save(2);
  EXPECT_NE(second, first);
  EXPECT_EQ(latest_checkpoint(f.root), second);
}

TEST(Checkpoint, KeepsTheNewestKAndInspectsAndExports) {
  Fixture f("keep");
  for (int s = 1; s <= 4; ++s) f.save(s, /*keep=*/2);
  int complete = 0;
  for (const auto& e : fs::directory_iterator(f.root))
    if (e.path().filename().string().rfind("ckpt-", 0) == 0) ++complete;
  EXPECT_EQ(complete, 2);
  const std::string latest = latest_checkpoint(f.root);
  EXPECT_NE(latest.find("step00000004"), std::string::npos);
  const std::string info = inspect_checkpoint(latest);
  EXPECT_NE(info.find("phase finetune, step 4"), std::string::npos) << info;
  EXPECT_NE(info.find("MoE block 1: 4 experts  r0:[0,1,2,3]"), std::string::npos) << info;
  const std::string out = f.root + "/export.safetensors";
  export_checkpoint(latest, out);
  SafetensorsFile x(out);
  EXPECT_TRUE(at::equal(x.get("blocks.1.moe.experts.w1"), f.model->moe_layers()[0]->experts->w1));
  EXPECT_TRUE(at::equal(x.get("head.weight"), f.model->head->weight));
}

// The optimiser state records the kind of the optimiser that saved it (re-fine-tuning
// checkpoints were once recorded with the fine-tuning optimiser's), and a checkpoint
// of another kind is refused with a message instead of loading half a state.
TEST(Checkpoint, OptimizerStateRecordsItsOwnKind) {
  Fixture f("optkind");
  PhaseConfig adam;
  adam.optimizer = OptimizerKind::AdamW;
  Optimizer a(adam, param_slots(f.model));
  ModelState state(f.model);
  CheckpointWriter w(Comms{&f.comm, &f.comm}, f.root, 3, false);
  w.save({&state, &a}, "refinetune", 3, f.job.resolved_yaml);
  const Manifest m = read_manifest(w.last_saved());
  EXPECT_EQ(m.section("optimizer").at("kind"), "adamw");
  EXPECT_EQ(m.phase, "refinetune");
  Optimizer sgd(PhaseConfig{}, param_slots(f.model));
  try {
    load_checkpoint(m, {&sgd});
    FAIL() << "an SGD optimiser must not load AdamW state";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("optimizer state is of adamw, this phase uses sgd"), std::string::npos)
        << e.what();
  }
  Optimizer again(adam, param_slots(f.model));
  EXPECT_NO_THROW(load_checkpoint(m, {&again}));
  // A state the checkpoint does not hold is named.
  RouterHistory history;
  try {
    load_checkpoint(m, {&history});
    FAIL() << "the checkpoint holds no router history";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("holds no 'router_history' state"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moeprune
