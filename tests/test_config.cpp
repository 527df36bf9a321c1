// Config parsing, overrides and validation: every rejection names the key or
// value and what was expected.
#include <gtest/gtest.h>

#include <filesystem>

#include "core/config.h"
#include "core/error.h"

namespace moeprune {
namespace {

std::string error_of(const std::string& yaml, const std::vector<std::string>& ov = {}) {
  try {
    parse_config_text(yaml, "test.yaml", ov);
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}

TEST(Config, EmbeddedDefaultParses) {
  const JobConfig cfg = parse_config("");
  EXPECT_EQ(cfg.model.name, "vmoe-tiny");
  EXPECT_EQ(cfg.model.moe.num_experts, 8);
  EXPECT_EQ(cfg.model.moe.top_k, 2);
  EXPECT_EQ(cfg.model.moe_blocks(), (std::vector<int>{1, 3, 5}));
  EXPECT_EQ(cfg.model.tokens_per_image(), 50);
}

TEST(Config, ShippedConfigsParse) {
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator(std::string(MOEPRUNE_SOURCE_DIR) + "/configs")) {
    const JobConfig cfg = parse_config(e.path().string());
    EXPECT_EQ(cfg.model.name, e.path().stem().string()) << e.path();
    EXPECT_NO_THROW(validate_world(cfg, 2)) << e.path();
    ++n;
  }
  EXPECT_GE(n, 19);
  const JobConfig e3 = parse_config(std::string(MOEPRUNE_SOURCE_DIR) + "/configs/e3-s32-cifar100.yaml");
  EXPECT_EQ(e3.model.moe_blocks(), (std::vector<int>{5, 7}));
  EXPECT_EQ(e3.model.moe.ensemble_size, 2);
}

TEST(Config, OverridesApply) {
  const JobConfig cfg = parse_config("", {"model.moe.top_k=1", "seed=42", "model.moe.bpr=true"});
  EXPECT_EQ(cfg.model.moe.top_k, 1);
  EXPECT_EQ(cfg.seed, 42u);
  EXPECT_TRUE(cfg.model.moe.bpr);
}

TEST(Config, UnknownKeyNamesKeyAndExpected) {
  const std::string e = error_of("model:\n  moe:\n    topk: 2\n");
  EXPECT_NE(e.find("unknown key 'model.moe.topk'"), std::string::npos) << e;
  EXPECT_NE(e.find("top_k"), std::string::npos) << e;
  EXPECT_NE(error_of("", {"trian.seed=1"}).find("unknown key 'trian'"), std::string::npos);
}

TEST(Config, BadValues) {
  EXPECT_NE(error_of("model: {moe: {top_k: 9}}").find("model.moe.top_k=9 must be <="), std::string::npos);
  EXPECT_NE(error_of("model: {moe: {num_experts: 6, ensemble_size: 4}}").find("divisible by model.moe.ensemble_size"),
            std::string::npos);
  EXPECT_NE(error_of("model: {moe: {every: 2, last: 1}}").find("set only one of"), std::string::npos);
  EXPECT_NE(error_of("model: {hidden: abc}").find("'model.hidden' has value 'abc', expected an integer"),
            std::string::npos);
  EXPECT_NE(error_of("finetune: {batch_size: 20}").find("must be a multiple of model.moe.group_size"), std::string::npos);
  EXPECT_NE(error_of("model: [1, 2]").find("'model' must be a mapping"), std::string::npos);
  EXPECT_NE(error_of("model: {hidden: 62}").find("divisible by model.num_heads"), std::string::npos);
  EXPECT_NE(error_of("finetune: {precision: fp16}").find("finetune.precision='fp16', expected fp32 or bf16"),
            std::string::npos);
}

TEST(Config, WorldSize) {
  const JobConfig cfg = parse_config("");
  EXPECT_NO_THROW(validate_world(cfg, 1));
  EXPECT_NO_THROW(validate_world(cfg, 4));
  try {
    validate_world(cfg, 3);
    FAIL() << "3 ranks cannot split 8 routing groups";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("does not divide the 8 routing groups"), std::string::npos) << e.what();
  }
  const JobConfig small = parse_config("", {"model.moe.num_experts=2", "finetune.batch_size=128", "pretrain.batch_size=128"});
  EXPECT_THROW(validate_world(small, 4), UserError);
}

TEST(Config, MoeBlocksEveryAndLast) {
  ModelConfig m;
  m.num_layers = 8;
  m.moe.every = 2;
  EXPECT_EQ(m.moe_blocks(), (std::vector<int>{1, 3, 5, 7}));
  m.moe.every = 3;
  EXPECT_EQ(m.moe_blocks(), (std::vector<int>{2, 5}));
  m.moe.every = 0;
  m.moe.last = 3;
  EXPECT_EQ(m.moe_blocks(), (std::vector<int>{3, 5, 7}));
}

}  // namespace
}  // namespace moeprune
