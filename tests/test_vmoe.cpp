// The vmoe checkpoint reader, writer and mapping against the fixtures written by
// Google's vmoe code (../shared/fixtures/vmoe: the oracle; missing fixtures fail).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <random>

#include "ckpt/vmoe_format.h"
#include "ckpt/vmoe_import.h"
#include "core/error.h"
#include "core/npy.h"
#include "test_tmp.h"

namespace moeprune {
namespace {

const std::string kFixtures = std::string(MOEPRUNE_SOURCE_DIR) + "/../shared/fixtures/vmoe/";
const char* const kAll[] = {"vmoe-tiny-every2", "vmoe-tiny-prelogits-bf16", "e3-tiny"};

std::string prefix(const std::string& fx) {
  const std::string p = kFixtures + fx + "/ckpt";
  if (!std::filesystem::exists(p + ".index")) ADD_FAILURE() << "fixture missing: " << p << ".index (shared/ beside the checkout?)";
  return p;
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}
void spit(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A copy of a fixture's checkpoint files in dir (prefix dir/ckpt).
std::string copy_fixture(const std::string& fx, const std::string& dir) {
  for (const auto& e : std::filesystem::directory_iterator(kFixtures + fx))
    if (e.path().filename().string().rfind("ckpt.", 0) == 0) spit(dir + "/" + e.path().filename().string(), slurp(e.path()));
  return dir + "/ckpt";
}

std::map<std::string, at::Tensor> read_all(const VmoeCheckpoint& ck) {
  std::vector<VmoeCheckpoint::Request> req;
  for (const auto& l : ck.leaves()) req.push_back({l.path, {}});
  return ck.read(req);
}

TEST(Vmoe, IndexMatchesVmoesOwnReading) {
  for (const char* fx : kAll) {
    const VmoeCheckpoint ck(prefix(fx));
    const auto dump = nlohmann::json::parse(slurp(kFixtures + fx + "/index_dump.json"));
    EXPECT_EQ(ck.version(), dump["version"].get<std::string>());
    EXPECT_EQ(ck.shard_count(), dump["shard_count"].get<int>());
    ASSERT_EQ(static_cast<int>(ck.leaves().size()), dump["num_leaves"].get<int>()) << fx;
    for (const auto& d : dump["leaves"]) {
      const VmoeLeaf& l = ck.leaves().at(d["leaf_id"].get<size_t>());
      EXPECT_EQ(l.path, d["path"].get<std::string>()) << fx << " leaf " << d["leaf_id"];
      EXPECT_EQ(l.shape, d["shape"].get<std::vector<int64_t>>()) << l.path;
      EXPECT_EQ(l.dtype, d["dtype"].get<std::string>()) << l.path;
      ASSERT_EQ(l.slices.size(), d["chunks"].size()) << l.path;
      for (size_t c = 0; c < l.slices.size(); ++c) {
        const auto& ch = d["chunks"][c];
        EXPECT_EQ(l.shards[c], ch["shard"].get<int>()) << l.path;
        for (size_t a = 0; a < l.slices[c].start.size(); ++a) {
          EXPECT_EQ(l.slices[c].start[a], ch["slice"][a][0].get<int64_t>()) << l.path;
          EXPECT_EQ(l.slices[c].stop[a], ch["slice"][a][1].get<int64_t>()) << l.path;
        }
      }
    }
  }
  // JAX's order sorts keys as strings: encoderblock_10 is leaf 35, before encoderblock_2.
  const VmoeCheckpoint ck(prefix("vmoe-tiny-every2"));
  EXPECT_EQ(ck.leaves()[35].path.rfind("Encoder/encoderblock_10/", 0), 0u);
  EXPECT_LT(ck.find("Encoder/encoderblock_11/LayerNorm_0/bias")->id, ck.find("Encoder/encoderblock_2/LayerNorm_0/bias")->id);
}

TEST(Vmoe, RowsAreTheRowsOfTheWholeLeaf) {
  const VmoeCheckpoint ck(prefix("vmoe-tiny-prelogits-bf16"));
  const std::string w = "Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel";  // bfloat16, one chunk per expert
  const auto whole = ck.read({{w, {}}}).at(w);
  const auto rows = ck.read({{w, {3, 0, 2}}}).at(w);
  EXPECT_TRUE(at::equal(rows, whole.index_select(0, at::tensor({3, 0, 2}, at::kLong))));
  // bfloat16 leaves are upcast exactly.
  EXPECT_TRUE(at::equal(whole, whole.to(at::kBFloat16).to(at::kFloat)));
  EXPECT_EQ(ck.find(w)->dtype, "bfloat16");
  EXPECT_THROW(ck.read({{w, {4}}}), UserError);  // only 4 experts
  EXPECT_THROW(ck.read({{"no/such/leaf", {}}}), UserError);
}

TEST(Vmoe, IndexWithoutVersionReadsTheSame) {
  test::TempDir dir("vmoe-nover");
  const std::string p = copy_fixture("e3-tiny", dir.path());
  // The index is {shard_count, index, version}: drop the last key (vmoe before 2022-06-22).
  std::string idx = slurp(p + ".index");
  const std::string tail = std::string("\xa7version\xa8" "20220622");
  ASSERT_EQ(idx.substr(idx.size() - tail.size()), tail);
  ASSERT_EQ(static_cast<unsigned char>(idx[0]), 0x83);
  idx = "\x82" + idx.substr(1, idx.size() - 1 - tail.size());
  spit(p + ".index", idx);
  const VmoeCheckpoint old(p), cur(prefix("e3-tiny"));
  EXPECT_EQ(old.version(), "");
  const auto a = read_all(old), b = read_all(cur);
  for (const auto& [k, v] : b) EXPECT_TRUE(at::equal(a.at(k), v)) << k;
}

TEST(Vmoe, WriterReadsBackBitExactInEveryDtype) {
  test::TempDir dir("vmoe-write");
  std::map<std::string, at::Tensor> params{
      {"a/Moe/Mlp/Dense_0/kernel", at::randn({6, 3, 5})},
      {"a/b", at::randn({4}).to(at::kBFloat16)},
      {"a_c/d", at::randn({2, 3})},  // "a" < "a_c" per level, though "a/b" > "a_c/d" as whole strings
      {"cls", at::randn({1, 1, 3})}};
  write_vmoe_checkpoint(dir.path() + "/ckpt", params, 3, 3);
  const VmoeCheckpoint ck(dir.path() + "/ckpt");
  EXPECT_EQ(ck.find("a/Moe/Mlp/Dense_0/kernel")->slices.size(), 3u);
  EXPECT_EQ(ck.find("a/b")->dtype, "bfloat16");
  EXPECT_LT(ck.find("a/b")->id, ck.find("a_c/d")->id);
  const auto got = read_all(ck);
  for (const auto& [k, v] : params) EXPECT_TRUE(at::equal(got.at(k), v.to(at::kFloat))) << k;
}

TEST(Vmoe, ForwardReproducesVmoesLogits) {
  for (const char* fx : kAll) {
    const VmoeCheckpoint ck(prefix(fx));
    ModelConfig base;
    base.moe.capacity_factor = 1.5;
    base.moe.group_size = 2;
    base.moe.top_k = std::string(fx) == "e3-tiny" ? 1 : 2;
    const ModelConfig mc = vmoe_model_config(ck, base);
    check_vmoe_leaves(ck, mc, false);
    SelfCommunicator comm;
    VisionTransformer model = build_model(mc, default_placements(mc, 1), comm, c10::Device(c10::kCPU), 0);
    load_vmoe(ck, model, false);
    model->eval();
    at::NoGradGuard ng;
    ForwardContext ctx;
    const at::Tensor x = read_npy(kFixtures + fx + "/inputs.npy").permute({0, 3, 1, 2}).contiguous();
    const at::Tensor logits = model->forward(x, ctx);  // [M, B, C]
    const int64_t M = logits.size(0), B = logits.size(1);
    const at::Tensor rows = logits.permute({1, 0, 2}).reshape({B * M, -1});  // vmoe: row b*M + m
    const at::Tensor want = read_npy(kFixtures + fx + "/logits.npy");
    // 1e-5: float32 throughout; the smallest semantic mistake (erf-GELU) is 2.3e-4.
    EXPECT_LE((rows - want).abs().max().item<double>(), 1e-5) << fx;
  }
}

TEST(Vmoe, CorruptIndexIsAnErrorNeverACrash) {
  // Every byte of the index flipped in turn: a UserError or the same checkpoint.
  test::TempDir dir("vmoe-fuzz");
  const std::string p = copy_fixture("vmoe-tiny-prelogits-bf16", dir.path());
  const std::string good = slurp(p + ".index");
  const VmoeCheckpoint ref(p);
  int errors = 0, same = 0, other = 0;
  for (size_t i = 0; i < good.size(); ++i) {
    std::string bad = good;
    bad[i] = static_cast<char>(bad[i] ^ 0x5a);
    spit(p + ".index", bad);
    try {
      const VmoeCheckpoint ck(p);
      bool eq = ck.leaves().size() == ref.leaves().size();
      for (size_t k = 0; eq && k < ck.leaves().size(); ++k)
        eq = ck.leaves()[k].path == ref.leaves()[k].path && ck.leaves()[k].shape == ref.leaves()[k].shape;
      (eq ? same : other)++;
    } catch (const UserError&) {
      ++errors;
    }
  }
  // A flipped byte inside a key renames a leaf (the mapping then names it): allowed, counted.
  EXPECT_GT(errors, static_cast<int>(good.size()) / 2);
  std::printf("index bytes flipped: %zu -> %d errors, %d unchanged, %d renamed leaves\n", good.size(), errors, same, other);
}

TEST(Vmoe, CorruptDataIsAnErrorOrOneValue) {
  // 400 seeded byte flips in a data file: a UserError naming the file or leaf, or
  // (a flip inside a float's bytes: the format has no checksum) one value changed.
  test::TempDir dir("vmoe-fuzz-data");
  const std::string p = copy_fixture("vmoe-tiny-every2", dir.path());
  const std::string file = p + ".data-00000-of-00002";
  const std::string good = slurp(file);
  const auto ref = read_all(VmoeCheckpoint(p));
  std::mt19937_64 rng(7);
  int errors = 0, one_value = 0;
  for (int t = 0; t < 400; ++t) {
    std::string bad = good;
    const size_t i = rng() % bad.size();
    bad[i] = static_cast<char>(bad[i] ^ (1 + rng() % 255));
    spit(file, bad);
    try {
      const auto got = read_all(VmoeCheckpoint(p));
      int64_t changed = 0;
      for (const auto& [k, v] : ref) changed += got.at(k).ne(v).sum().item<int64_t>();
      EXPECT_LE(changed, 1) << "flip at byte " << i;
      ++one_value;
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find("vmoe"), std::string::npos) << e.what();
      ++errors;
    }
  }
  std::printf("data bytes flipped: 400 -> %d errors, %d changed at most one value\n", errors, one_value);
}

}  // namespace
}  // namespace moeprune
