// Data: IDX and CIFAR readers on files the test writes (raw and gzip), clear
// errors for truncated and mislabelled files, safetensors round trip and
// corruption, task splits, and the sharded loader (disjoint and complete shards
// for 1, 2 and 3 ranks, restart at (epoch, step), prefetch equal to none).
#include <gtest/gtest.h>
#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "core/error.h"
#include "core/pixel_code.h"
#include "core/safetensors.h"
#include "data/loader.h"
#include "test_tmp.h"

namespace moeprune {
namespace {
namespace fs = std::filesystem;

void put_be32(std::vector<uint8_t>& v, uint32_t x) {
  for (int s = 24; s >= 0; s -= 8) v.push_back(static_cast<uint8_t>(x >> s));
}

void write_file(const fs::path& p, const std::vector<uint8_t>& bytes, bool gz) {
  if (gz) {
    gzFile f = gzopen(p.c_str(), "wb");
    gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
    gzclose(f);
  } else {
    std::ofstream(p, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }
}

// n images of 4x3 pixels; pixel value = image index, label = index % 10 (or `bad` for the last).
void write_idx(const fs::path& dir, int n, bool gz, int bad_label = -1, int truncate = 0) {
  std::vector<uint8_t> img, lab;
  put_be32(img, 0x803);
  put_be32(img, n);
  put_be32(img, 4);
  put_be32(img, 3);
  for (int i = 0; i < n; ++i)
    for (int p = 0; p < 12; ++p) img.push_back(static_cast<uint8_t>(i));
  img.resize(img.size() - truncate);
  put_be32(lab, 0x801);
  put_be32(lab, n);
  for (int i = 0; i < n; ++i) lab.push_back(static_cast<uint8_t>(i == n - 1 && bad_label >= 0 ? bad_label : i % 10));
  const std::string ext = gz ? ".gz" : "";
  write_file(dir / ("train-images-idx3-ubyte" + ext), img, gz);
  write_file(dir / ("train-labels-idx1-ubyte" + ext), lab, gz);
}

std::string user_error(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}

TEST(Data, IdxRawAndGzip) {
  for (bool gz : {false, true}) {
    test::TempDir tmp(gz ? "idxgz" : "idx");
  const fs::path d = tmp.path();
    write_idx(d, 7, gz);
    const std::string ext = gz ? ".gz" : "";
    auto ds = read_idx((d / ("train-images-idx3-ubyte" + ext)).string(), (d / ("train-labels-idx1-ubyte" + ext)).string(),
                       10, "t");
    EXPECT_EQ(ds->size(), 7);
    EXPECT_EQ(ds->shape(), (std::vector<int64_t>{1, 4, 3}));
    EXPECT_EQ(ds->labels()[6], 6);
    EXPECT_EQ(ds->images({5}).sum().item<int64_t>(), 5 * 12);
  }
}

TEST(Data, IdxTruncatedAndMislabelled) {
  test::TempDir tmp("idxbad");
  const fs::path d = tmp.path();
  write_idx(d, 5, false, -1, /*truncate=*/7);
  const std::string e = user_error([&] {
    read_idx((d / "train-images-idx3-ubyte").string(), (d / "train-labels-idx1-ubyte").string(), 10, "t");
  });
  EXPECT_NE(e.find("truncated"), std::string::npos) << e;
  write_idx(d, 5, false, /*bad_label=*/12);
  const std::string e2 = user_error([&] {
    read_idx((d / "train-images-idx3-ubyte").string(), (d / "train-labels-idx1-ubyte").string(), 10, "t");
  });
  EXPECT_NE(e2.find("label 12 at example 4 is outside [0, 10)"), std::string::npos) << e2;
  EXPECT_NE(user_error([&] { read_idx("/nonexistent/a", "/nonexistent/b", 10, "t"); }).find("missing file"),
            std::string::npos);
}

TEST(Data, Cifar10And100) {
  test::TempDir tmp("cifar");
  const fs::path d = tmp.path();
  auto record = [](std::vector<uint8_t>& v, std::initializer_list<int> labels, int fill) {
    for (int l : labels) v.push_back(static_cast<uint8_t>(l));
    for (int i = 0; i < 3072; ++i) v.push_back(static_cast<uint8_t>(fill));
  };
  for (int b = 1; b <= 5; ++b) {
    std::vector<uint8_t> v;
    record(v, {b}, b);
    record(v, {9}, 100 + b);
    write_file(d / ("data_batch_" + std::to_string(b) + ".bin"), v, false);
  }
  std::vector<uint8_t> t;
  record(t, {3}, 7);
  write_file(d / "test_batch.bin", t, false);
  auto tr = read_cifar10(d.string(), "train");
  EXPECT_EQ(tr->size(), 10);
  EXPECT_EQ(tr->labels()[2], 2);
  EXPECT_EQ(tr->images({3}).max().item<int64_t>(), 102);
  EXPECT_EQ(read_cifar10(d.string(), "test")->labels()[0], 3);

  std::vector<uint8_t> c100;
  record(c100, {4, 77}, 1);
  record(c100, {19, 99}, 2);
  write_file(d / "train.bin", c100, false);
  EXPECT_EQ(read_cifar100(d.string(), "train", false)->labels(), (std::vector<int64_t>{77, 99}));
  EXPECT_EQ(read_cifar100(d.string(), "train", true)->labels(), (std::vector<int64_t>{4, 19}));
  c100.pop_back();
  write_file(d / "train.bin", c100, false);
  EXPECT_NE(user_error([&] { read_cifar100(d.string(), "train", false); }).find("truncated"), std::string::npos);
  std::vector<uint8_t> bad;
  record(bad, {10}, 0);
  write_file(d / "test_batch.bin", bad, false);
  EXPECT_NE(user_error([&] { read_cifar10(d.string(), "test"); }).find("label 10"), std::string::npos);
}

TEST(Data, SafetensorsRoundTripAndCorruption) {
  test::TempDir tmp("st");
  const fs::path d = tmp.path();
  const std::string p = (d / "a.safetensors").string();
  NamedTensors t{{"x", at::arange(6, at::kFloat).reshape({2, 3})},
                 {"y", at::tensor({1, 2, 3}, at::kLong)},
                 {"z", at::ones({2, 2}, at::kBFloat16)},
                 {"e", at::empty({0, 4})}};
  write_safetensors(p, t, {{"k", "v"}});
  SafetensorsFile f(p);
  for (const auto& [name, v] : t) EXPECT_TRUE(at::equal(f.get(name), v)) << name;
  EXPECT_EQ(f.metadata().at("k"), "v");
  // Truncation is caught by the offset check.
  fs::resize_file(p, fs::file_size(p) - 3);
  EXPECT_NE(user_error([&] { SafetensorsFile g(p); }).find("outside"), std::string::npos);
  std::ofstream(p, std::ios::binary) << "garbage!";
  EXPECT_NE(user_error([&] { SafetensorsFile g(p); }).find("not a valid safetensors file"), std::string::npos);
}

// Dataset whose pixel value identifies the example.
std::shared_ptr<TensorDataset> counting(int n, int classes) {
  at::Tensor img = at::arange(n, at::kLong).remainder(256).to(at::kByte).view({n, 1, 1, 1}).expand({n, 1, 2, 2});
  std::vector<int64_t> labels(n);
  for (int i = 0; i < n; ++i) labels[i] = i % classes;
  return std::make_shared<TensorDataset>(img.contiguous(), labels, classes, "counting");
}

TEST(Data, SplitsClassSubsetAndLabelMap) {
  auto ds = counting(200, 10);
  PhaseConfig task;
  task.classes = {7, 2, 5};
  Split tr = make_split(ds, task, "t", SplitPart::Train, 0.1);
  Split va = make_split(ds, task, "t", SplitPart::Val, 0.1);
  EXPECT_EQ(tr.size() + va.size(), 60);
  EXPECT_EQ(va.size(), 6);
  for (int64_t i = 0; i < tr.size(); ++i) {
    const int64_t c = ds->labels()[tr.index[i]];
    EXPECT_EQ(tr.label[i], c == 7 ? 0 : c == 2 ? 1 : 2);
  }
  task.label_map = {0, 1, 0};  // regroup: 7 and 5 -> 0
  Split rg = make_split(ds, task, "t", SplitPart::Test, 0.1);
  EXPECT_EQ(rg.num_labels, 2);
  EXPECT_EQ(rg.size(), 60);
  task.classes = {3, 11};
  task.label_map.clear();
  EXPECT_NE(user_error([&] { make_split(ds, task, "t", SplitPart::Train, 0.1); }).find("class 11"), std::string::npos);
}

TEST(Data, PixelCodes) {
  const PixelCode id = pixel_code("identity"), inv = pixel_code("invert"), fold = pixel_code("fold");
  const PixelCode bands = pixel_code("bands:2,0r,3,1r");
  std::set<int> seen_fold, seen_bands;
  for (int v = 0; v < 256; ++v) {
    EXPECT_EQ(id[v], v);
    EXPECT_EQ(inv[v], 255 - v);
    seen_fold.insert(fold[v]);
    seen_bands.insert(bands[v]);
  }
  EXPECT_EQ(seen_bands.size(), 256u);  // a permutation of the levels
  EXPECT_EQ(seen_fold.size(), 128u);   // every other level
  EXPECT_EQ(fold[0], 128);             // background -> mid-grey
  EXPECT_EQ(fold[255], 0);             // the brightest band folds below grey
  EXPECT_EQ(fold[32], 111);            // second band: below grey
  // band 0 -> band 2 (kept order), band 1 -> band 0 reversed
  EXPECT_EQ(bands[0], 128);
  EXPECT_EQ(bands[63], 191);
  EXPECT_EQ(bands[64], 63);
  EXPECT_EQ(bands[127], 0);
  for (const char* bad :
       {"bands:0,0", "bands:1", "bands:0,1,2", "bands:0,x", "bands:", "swirl", "bands:0,5", "bands:0,1,", "bands:0,,1"})
    EXPECT_NE(user_error([&] { pixel_code(bad); }).find("data.domains has code"), std::string::npos) << bad;
}

TEST(Data, DomainsInterleaveCodesAndLabels) {
  test::TempDir tmp("domains");
  write_idx(tmp.path(), 20, false);
  JobConfig cfg;
  cfg.data.dataset = DatasetKind::Mnist;
  cfg.data.root = tmp.path();
  auto base = load_dataset(cfg, SplitPart::Train);
  cfg.data.domains = {"identity", "invert", "fold"};
  auto ds = load_dataset(cfg, SplitPart::Train);
  ASSERT_EQ(ds->size(), 60);
  EXPECT_EQ(ds->num_classes(), 30);
  EXPECT_EQ(ds->shape(), base->shape());
  const PixelCode fold = pixel_code("fold");
  for (int64_t i : {0, 1, 2, 31, 59}) {
    const int64_t b = i / 3, d = i % 3;
    EXPECT_EQ(ds->labels()[i], d * 10 + base->labels()[b]) << i;
    const at::Tensor px = ds->images({i});
    const int64_t v = base->images({b}).flatten()[0].item<int64_t>();  // every pixel of image b is b
    const int64_t want = d == 0 ? v : d == 1 ? 255 - v : fold[v];
    EXPECT_TRUE(px.eq(want).all().item<bool>()) << i;
  }
  // Interleaved: the last 10% of a task spanning two domains holds both.
  PhaseConfig task;
  task.classes = {3, 13};  // class 3 as it is and inverted
  Split va = make_split(ds, task, "t", SplitPart::Val, 0.5);
  std::set<int64_t> labels(va.label.begin(), va.label.end());
  EXPECT_EQ(labels, (std::set<int64_t>{0, 1}));
}

std::vector<int64_t> ids_of(const Batch& b) {
  at::Tensor v = b.images.select(1, 0).select(1, 0).select(1, 0);  // one pixel per image, still normalised
  at::Tensor raw = (v * 0.5 + 0.5) * 255.0;
  std::vector<int64_t> out;
  for (int64_t i = 0; i < raw.size(0); ++i) out.push_back(std::lround(raw[i].item<double>()));
  return out;
}

LoaderOptions opts(int rank, int world, bool train, int prefetch) {
  LoaderOptions o;
  o.global_batch = 12;
  o.rank = rank;
  o.world = world;
  o.seed = 3;
  o.train = train;
  o.image_size = 2;
  o.channels = 1;
  o.prefetch = prefetch;
  return o;
}

TEST(Loader, ShardsDisjointAndCompleteFor1To3Ranks) {
  auto ds = counting(120, 4);
  Split s = make_split(ds, PhaseConfig{}, "t", SplitPart::Test, 0.0);
  for (int world : {1, 2, 3}) {
    std::set<int64_t> seen;
    std::vector<int64_t> global_step0;
    for (int r = 0; r < world; ++r) {
      ShardedLoader l(s, opts(r, world, true, 0));
      EXPECT_EQ(l.steps_per_epoch(), 10);
      for (int64_t step = 0; step < l.steps_per_epoch(); ++step) {
        const auto ids = ids_of(l.next());
        EXPECT_EQ(static_cast<int>(ids.size()), 12 / world);
        for (int64_t id : ids) EXPECT_TRUE(seen.insert(id).second) << "example " << id << " twice";
        if (step == 0) global_step0.insert(global_step0.end(), ids.begin(), ids.end());
      }
    }
    EXPECT_EQ(seen.size(), 120u) << world << " ranks";
    // The union of the ranks' slices of a step is the same global batch for any world size.
    static std::vector<int64_t> reference;
    if (world == 1) reference = global_step0;
    EXPECT_EQ(global_step0, reference) << world << " ranks";
  }
}

TEST(Loader, RestartAtEpochAndStepAndPrefetch) {
  auto ds = counting(120, 4);
  Split s = make_split(ds, PhaseConfig{}, "t", SplitPart::Test, 0.0);
  LoaderOptions o = opts(1, 2, true, 0);
  o.augment.flip = true;
  o.augment.crop_padding = 1;
  ShardedLoader plain(s, o);
  std::vector<at::Tensor> run;
  for (int i = 0; i < 25; ++i) run.push_back(plain.next().images);  // crosses two epochs
  o.prefetch = 3;
  ShardedLoader pre(s, o);
  pre.seek(1, 3);  // batch 13
  for (int i = 13; i < 25; ++i) EXPECT_TRUE(at::equal(pre.next().images, run[i])) << "batch " << i;
  // A new epoch has a new order.
  EXPECT_FALSE(at::equal(run[0], run[10]));
}

TEST(Loader, EvaluationPadsTheLastBatch) {
  auto ds = counting(30, 4);
  Split s = make_split(ds, PhaseConfig{}, "t", SplitPart::Test, 0.0);
  ShardedLoader l(s, opts(0, 1, false, 2));
  EXPECT_EQ(l.steps_per_epoch(), 3);
  l.next();
  l.next();
  Batch last = l.next();
  EXPECT_EQ(last.valid.sum().item<int64_t>(), 6);
  EXPECT_EQ(ids_of(last)[5], 29);
}

TEST(Loader, InceptionCropIsWorldSizeIndependentAndCrops) {
  // 16x16 images with a horizontal and a vertical ramp: every crop box shows.
  const int n = 48;
  at::Tensor ramp = (at::arange(16).view({1, 16}) * 8 + at::arange(16).view({16, 1}) * 3).to(at::kByte);
  at::Tensor img = ramp.view({1, 1, 16, 16}).expand({n, 1, 16, 16}).contiguous();
  auto ds = std::make_shared<TensorDataset>(img, std::vector<int64_t>(n, 0), 1, "ramps");
  Split s = make_split(ds, PhaseConfig{}, "t", SplitPart::Test, 0.0);
  auto make = [&](int rank, int world) {
    LoaderOptions o = opts(rank, world, true, 0);
    o.image_size = 8;
    o.augment.inception_crop = true;
    o.augment.flip = true;
    return ShardedLoader(s, o).next().images;
  };
  const at::Tensor one = make(0, 1);
  ASSERT_EQ(one.sizes(), (std::vector<int64_t>{12, 1, 8, 8}));
  EXPECT_TRUE(at::equal(one, at::cat({make(0, 2), make(1, 2)}, 0)));
  EXPECT_TRUE(at::equal(one, at::cat({make(0, 3), make(1, 3), make(2, 3)}, 0)));
  // Plain resizing (what evaluation does) gives one image for all; crops differ from it and each other.
  LoaderOptions e = opts(0, 1, false, 0);
  e.image_size = 8;
  const at::Tensor whole = ShardedLoader(s, e).next().images;
  int differ = 0;
  for (int64_t i = 0; i < 12; ++i) differ += !at::allclose(one[i], whole[i]);
  EXPECT_GE(differ, 10);
  EXPECT_FALSE(at::equal(one[0], one[1]));
}

}  // namespace
}  // namespace moeprune
