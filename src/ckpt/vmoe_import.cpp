#include "ckpt/vmoe_import.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>

#include "ckpt/model_file.h"
#include "core/error.h"
#include "core/strings.h"

namespace moeprune {
namespace {

using Shape = std::vector<int64_t>;

std::string shape_str(const Shape& s) {
  std::string o = "(";
  for (size_t d = 0; d < s.size(); ++d) o += (d ? ", " : "") + std::to_string(s[d]);
  return o + (s.size() == 1 ? ",)" : ")");
}

std::string block_path(int b) { return concat("Encoder/encoderblock_", b, "/"); }

// How one moeprune parameter is made from vmoe leaves.
enum class Kind {
  Copy,       // same shape (LayerNorm, biases, cls, position embeddings)
  Transpose,  // Dense kernel (in, out) -> Linear weight (out, in)
  Conv,       // HWIO -> OIHW
  Qkv,        // 3 leaves: query/key/value kernels (H, n, d) -> (3H, H); or their biases (n, d) -> (3H)
  AttnOut,    // (n, d, H) -> (H, H) transposed
  Router,     // (H, E) or (H, M, E/M) -> member's columns (H, E/M)
  Expert,     // (E, ...) -> this rank's rows
  PosEmbed,   // (1, T, H), zoomed to the model's grid when T differs
};

struct Binding {
  std::string param;
  std::vector<std::string> leaves;
  Kind kind = Kind::Copy;
  int block = -1, member = 0;
};

// Every parameter of a model of cfg and the leaves it comes from, with each leaf's
// shape: the one table both directions use.
struct Table {
  std::vector<Binding> bindings;
  std::map<std::string, Shape> shapes;   // vmoe leaf -> expected shape
  std::set<std::string> head_leaves;     // dropped with a new head
  std::string pos_leaf = "Encoder/posembed_input/pos_embedding";
};

Table make_table(const ModelConfig& cfg) {
  Table t;
  const int64_t H = cfg.hidden, F = cfg.mlp_dim, n = cfg.num_heads, d = H / n, P = cfg.patch_size;
  const int64_t E = cfg.moe.num_experts, M = cfg.moe.ensemble_size;
  auto leaf = [&](const std::string& path, Shape s) { t.shapes[path] = std::move(s); };
  auto bind = [&](std::string param, std::vector<std::string> leaves, Kind k, int block = -1, int member = 0) {
    t.bindings.push_back(Binding{std::move(param), std::move(leaves), k, block, member});
  };
  leaf("embedding/kernel", {P, P, cfg.channels, H});
  leaf("embedding/bias", {H});
  bind("patch_embed.weight", {"embedding/kernel"}, Kind::Conv);
  bind("patch_embed.bias", {"embedding/bias"}, Kind::Copy);
  leaf("cls", {1, 1, H});
  bind("cls_token", {"cls"}, Kind::Copy);
  leaf(t.pos_leaf, {1, cfg.tokens_per_image(), H});
  bind("pos_embed", {t.pos_leaf}, Kind::PosEmbed);
  const std::vector<int> moe = cfg.moe_blocks();
  for (int b = 0; b < cfg.num_layers; ++b) {
    const std::string bp = block_path(b), pp = concat("blocks.", b, ".");
    for (const auto& [ln, name] : {std::pair{"LayerNorm_0", "ln1"}, std::pair{"LayerNorm_1", "ln2"}}) {
      leaf(bp + ln + "/scale", {H});
      leaf(bp + ln + "/bias", {H});
      bind(pp + name + ".weight", {bp + ln + "/scale"}, Kind::Copy);
      bind(pp + name + ".bias", {bp + ln + "/bias"}, Kind::Copy);
    }
    const std::string sa = bp + "SelfAttention/";
    std::vector<std::string> kernels, biases;
    for (const char* q : {"query", "key", "value"}) {
      leaf(sa + q + "/kernel", {H, n, d});
      leaf(sa + q + "/bias", {n, d});
      kernels.push_back(sa + q + "/kernel");
      biases.push_back(sa + q + "/bias");
    }
    bind(pp + "qkv.weight", kernels, Kind::Qkv);
    bind(pp + "qkv.bias", biases, Kind::Qkv);
    leaf(sa + "out/kernel", {n, d, H});
    leaf(sa + "out/bias", {H});
    bind(pp + "proj.weight", {sa + "out/kernel"}, Kind::AttnOut);
    bind(pp + "proj.bias", {sa + "out/bias"}, Kind::Copy);
    if (std::find(moe.begin(), moe.end(), b) != moe.end()) {
      const std::string router = bp + "Moe/Router/dense/kernel";
      leaf(router, M > 1 ? Shape{H, M, E / M} : Shape{H, E});
      for (int m = 0; m < M; ++m) bind(concat(pp, "moe.routers.", m, ".weight"), {router}, Kind::Router, b, m);
      const std::string mlp = bp + "Moe/Mlp/";
      leaf(mlp + "Dense_0/kernel", {E, H, F});
      leaf(mlp + "Dense_0/bias", {E, F});
      leaf(mlp + "Dense_1/kernel", {E, F, H});
      leaf(mlp + "Dense_1/bias", {E, H});
      bind(pp + "moe.experts.w1", {mlp + "Dense_0/kernel"}, Kind::Expert, b);
      bind(pp + "moe.experts.b1", {mlp + "Dense_0/bias"}, Kind::Expert, b);
      bind(pp + "moe.experts.w2", {mlp + "Dense_1/kernel"}, Kind::Expert, b);
      bind(pp + "moe.experts.b2", {mlp + "Dense_1/bias"}, Kind::Expert, b);
    } else {
      const std::string mlp = bp + "Mlp/";
      leaf(mlp + "Dense_0/kernel", {H, F});
      leaf(mlp + "Dense_0/bias", {F});
      leaf(mlp + "Dense_1/kernel", {F, H});
      leaf(mlp + "Dense_1/bias", {H});
      bind(pp + "fc1.weight", {mlp + "Dense_0/kernel"}, Kind::Transpose);
      bind(pp + "fc1.bias", {mlp + "Dense_0/bias"}, Kind::Copy);
      bind(pp + "fc2.weight", {mlp + "Dense_1/kernel"}, Kind::Transpose);
      bind(pp + "fc2.bias", {mlp + "Dense_1/bias"}, Kind::Copy);
    }
  }
  leaf("Encoder/encoder_norm/scale", {H});
  leaf("Encoder/encoder_norm/bias", {H});
  bind("norm.weight", {"Encoder/encoder_norm/scale"}, Kind::Copy);
  bind("norm.bias", {"Encoder/encoder_norm/bias"}, Kind::Copy);
  int64_t head_in = H;
  if (cfg.representation_size > 0) {
    const int64_t R = cfg.representation_size;
    leaf("pre_logits/kernel", {H, R});
    leaf("pre_logits/bias", {R});
    bind("pre_logits.weight", {"pre_logits/kernel"}, Kind::Transpose);
    bind("pre_logits.bias", {"pre_logits/bias"}, Kind::Copy);
    head_in = R;
  }
  leaf("head/kernel", {head_in, cfg.num_classes});
  leaf("head/bias", {cfg.num_classes});
  bind("head.weight", {"head/kernel"}, Kind::Transpose);
  bind("head.bias", {"head/bias"}, Kind::Copy);
  t.head_leaves = {"head/kernel", "head/bias"};
  return t;
}

const VmoeLeaf& need(const VmoeCheckpoint& ck, const std::string& path, const std::string& why) {
  const VmoeLeaf* l = ck.find(path);
  require(l, concat("vmoe checkpoint '", ck.prefix(), "' has no leaf '", path, "' (", why, ")"));
  return *l;
}

// Which config key a leaf's shape speaks for, for the mismatch message.
std::string hint_for(const std::string& leaf) {
  if (leaf.find("Moe/Mlp") != std::string::npos || leaf.find("Router") != std::string::npos)
    return "model.hidden, model.mlp_dim, model.moe.num_experts, model.moe.ensemble_size";
  if (leaf.find("pos_embedding") != std::string::npos) return "model.image_size / model.patch_size";
  if (leaf.find("embedding/kernel") != std::string::npos) return "model.patch_size, model.channels, model.hidden";
  if (leaf.find("SelfAttention") != std::string::npos) return "model.hidden, model.num_heads";
  if (leaf.find("Mlp") != std::string::npos) return "model.hidden, model.mlp_dim";
  if (leaf.find("pre_logits") != std::string::npos) return "model.representation_size";
  if (leaf.find("head") != std::string::npos) return "model.num_classes, model.representation_size";
  return "model.hidden";
}

// vit_zoom: the class-token row kept, the g x g grid resized to n x n by linear
// interpolation with the corners aligned (scipy.ndimage.zoom, order=1), in float64.
at::Tensor zoom_pos_embed(const at::Tensor& pos, int64_t tokens) {
  const int64_t H = pos.size(2);
  const auto g = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(pos.size(1) - 1))));
  const auto n = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(tokens - 1))));
  at::Tensor grid = pos.narrow(1, 1, g * g).to(at::kDouble).reshape({1, g, g, H}).permute({0, 3, 1, 2});
  grid = at::upsample_bilinear2d(grid, {n, n}, /*align_corners=*/true).permute({0, 2, 3, 1}).reshape({1, n * n, H});
  return at::cat({pos.narrow(1, 0, 1), grid.to(pos.scalar_type())}, 1);
}

bool grid_tokens(int64_t t) {
  const auto g = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(t - 1))));
  return t >= 2 && g * g == t - 1;
}

}  // namespace

ModelConfig vmoe_model_config(const VmoeCheckpoint& ck, const ModelConfig& base) {
  ModelConfig m = base;
  const std::string what = "a V-MoE or E3 parameter tree has it";
  const VmoeLeaf& cls = need(ck, "cls", what + "; only classifier='token' models are supported");
  const VmoeLeaf& emb = need(ck, "embedding/kernel", what);
  const VmoeLeaf& pos = need(ck, "Encoder/posembed_input/pos_embedding", what);
  const VmoeLeaf& head = need(ck, "head/kernel", what);
  auto bad = [&](const std::string& msg) { throw UserError(concat("vmoe checkpoint '", ck.prefix(), "': ", msg)); };
  if (cls.shape.size() != 3) bad(concat("'cls' is ", cls.shape_str(), ", expected (1, 1, hidden)"));
  m.hidden = static_cast<int>(cls.shape[2]);
  if (emb.shape.size() != 4 || emb.shape[0] != emb.shape[1])
    bad(concat("'embedding/kernel' is ", emb.shape_str(), ", expected (patch, patch, channels, hidden)"));
  m.patch_size = static_cast<int>(emb.shape[0]);
  m.channels = static_cast<int>(emb.shape[2]);
  if (pos.shape.size() != 3 || !grid_tokens(pos.shape[1]))
    bad(concat("'", pos.path, "' is ", pos.shape_str(), ", expected (1, 1 + g*g, hidden): a class token and a square grid"));
  m.image_size = static_cast<int>(std::llround(std::sqrt(static_cast<double>(pos.shape[1] - 1)))) * m.patch_size;
  if (head.shape.size() != 2) bad(concat("'head/kernel' is ", head.shape_str(), ", expected (in, classes)"));
  m.num_classes = static_cast<int>(head.shape[1]);
  const VmoeLeaf* pre = ck.find("pre_logits/kernel");
  m.representation_size = pre && pre->shape.size() == 2 ? static_cast<int>(pre->shape[1]) : 0;

  std::set<int> blocks, moe;
  for (const auto& l : ck.leaves()) {
    const std::string prefix = "Encoder/encoderblock_";
    if (l.path.rfind(prefix, 0) != 0) continue;
    const auto end = l.path.find('/', prefix.size());
    const std::string num = l.path.substr(prefix.size(), end - prefix.size());
    if (num.empty() || num.size() > 4 || !std::all_of(num.begin(), num.end(), ::isdigit))
      bad(concat("'", l.path, "' is not a numbered encoder block"));
    const int b = std::stoi(num);
    blocks.insert(b);
    if (l.path.find("/Moe/Router/") != std::string::npos) moe.insert(b);
  }
  if (blocks.empty()) bad("no Encoder/encoderblock_N leaves");
  m.num_layers = static_cast<int>(blocks.size());
  if (*blocks.rbegin() != m.num_layers - 1)
    bad(concat("encoder blocks are not numbered 0..", m.num_layers - 1, " (highest: ", *blocks.rbegin(), ")"));
  const VmoeLeaf& q = need(ck, block_path(0) + "SelfAttention/query/kernel", what);
  if (q.shape.size() != 3) bad(concat("'", q.path, "' is ", q.shape_str(), ", expected (hidden, heads, head_dim)"));
  m.num_heads = static_cast<int>(q.shape[1]);
  if (moe.empty()) bad("no MoE block (no Moe/Router leaves): a dense ViT is not an MoE model");
  const int b0 = *moe.begin();
  const VmoeLeaf& w1 = need(ck, block_path(b0) + "Moe/Mlp/Dense_0/kernel", what);
  const VmoeLeaf& router = need(ck, block_path(b0) + "Moe/Router/dense/kernel", what);
  if (w1.shape.size() != 3) bad(concat("'", w1.path, "' is ", w1.shape_str(), ", expected (experts, hidden, mlp)"));
  m.mlp_dim = static_cast<int>(w1.shape[2]);
  m.moe.num_experts = static_cast<int>(w1.shape[0]);
  if (router.shape.size() == 3) {
    m.moe.ensemble_size = static_cast<int>(router.shape[1]);
  } else if (router.shape.size() != 2) {
    bad(concat("'", router.path, "' is ", router.shape_str(), ", expected (hidden, experts) or (hidden, members, experts/member)"));
  } else if (m.moe.num_experts % std::max(1, base.moe.ensemble_size) != 0) {
    m.moe.ensemble_size = 1;
  }
  // vmoe's "every N" (blocks N-1, 2N-1, ...) or "last N" (the last N odd blocks).
  const std::vector<int> want(moe.begin(), moe.end());
  m.moe.every = want.front() + 1;
  m.moe.last = 0;
  if (m.moe_blocks() != want) {
    m.moe.every = 0;
    m.moe.last = static_cast<int>(want.size());
    if (m.moe_blocks() != want) {
      bad(concat("MoE blocks ", join(want, ","), " follow neither vmoe's 'every N' nor its 'last N' pattern"));
    }
  }
  m.name = std::filesystem::path(ck.prefix()).filename().string();
  m.kept_experts.clear();
  return m;
}

void check_vmoe_leaves(const VmoeCheckpoint& ck, const ModelConfig& cfg, bool new_head) {
  const Table t = make_table(cfg);
  for (const auto& [path, shape] : t.shapes) {
    if (new_head && t.head_leaves.count(path)) continue;
    const VmoeLeaf* l = ck.find(path);
    require(l, concat("vmoe checkpoint '", ck.prefix(), "' has no leaf '", path, "', which a model of this config needs ",
                      "with shape ", shape_str(shape), " (see ", hint_for(path), ")"));
    bool ok = l->shape == shape;
    // E3 from a V-MoE router: (H, E) is split into the members' columns (vmoe's reshape rule).
    if (!ok && shape.size() == 3 && path.find("Router") != std::string::npos)
      ok = l->shape == Shape{shape[0], shape[1] * shape[2]};
    // Fine-tuning at another resolution: the position embeddings are zoomed.
    if (!ok && new_head && path == t.pos_leaf)
      ok = l->shape.size() == 3 && l->shape[0] == 1 && l->shape[2] == shape[2] && grid_tokens(l->shape[1]);
    require(ok, concat("vmoe checkpoint '", ck.prefix(), "': leaf '", path, "' is ", l->shape_str(),
                       ", the model config needs ", shape_str(shape), " (see ", hint_for(path), ")"));
  }
  for (const auto& l : ck.leaves()) {
    if (t.shapes.count(l.path)) continue;
    if (new_head && (l.path.rfind("head/", 0) == 0)) continue;
    // vmoe's fine-tuning configs without representation_size leave the upstream pre_logits unused.
    if (new_head && cfg.representation_size == 0 && l.path.rfind("pre_logits/", 0) == 0) continue;
    throw UserError(concat("vmoe checkpoint '", ck.prefix(), "': leaf '", l.path, "' ", l.shape_str(),
                           " has no place in a model of this config (",
                           l.path.rfind("pre_logits/", 0) == 0 ? "set model.representation_size"
                           : l.path.find("/Moe/") != std::string::npos
                               ? "its MoE blocks are model.moe.every / model.moe.last"
                               : "is it a V-MoE checkpoint of another architecture?",
                           ")"));
  }
}

VmoeLoadReport load_vmoe(const VmoeCheckpoint& ck, VisionTransformer& model, bool new_head) {
  at::NoGradGuard ng;
  const ModelConfig& cfg = model->config();
  const Table t = make_table(cfg);
  std::map<int, MoeLayer> layers;
  for (const auto& l : model->moe_layers()) layers.emplace(l->layer(), l);
  // One parameter at a time: a rank holds at most one parameter's leaves besides the
  // model (and the data file pages it touched are released after each read).
  VmoeLoadReport rep;
  auto params = model->named_parameters();
  const int64_t H = cfg.hidden;
  for (const Binding& b : t.bindings) {
    if (new_head && b.param.rfind("head.", 0) == 0) continue;
    at::Tensor* p = params.find(b.param);
    TORCH_CHECK(p, "vmoe import: the model has no parameter ", b.param);
    if (b.kind == Kind::Expert && p->size(0) == 0) continue;  // a rank without experts in this layer
    std::vector<VmoeCheckpoint::Request> requests;
    for (const std::string& leaf : b.leaves) {
      VmoeCheckpoint::Request r{leaf, {}};
      if (b.kind == Kind::Expert) {
        const auto& ids = layers.at(b.block)->experts->expert_ids();
        r.rows.assign(ids.begin(), ids.end());
      }
      requests.push_back(std::move(r));
    }
    const std::map<std::string, at::Tensor> got = ck.read(requests);
    rep.leaves += static_cast<int64_t>(got.size());
    for (const auto& [k, v] : got) rep.elements += v.numel();
    const at::Tensor& src = got.at(b.leaves[0]);
    at::Tensor v;
    switch (b.kind) {
      case Kind::Copy: v = src; break;
      case Kind::Transpose: v = src.t(); break;
      case Kind::Conv: v = src.permute({3, 2, 0, 1}); break;
      case Kind::Qkv: {
        std::vector<at::Tensor> parts;
        for (const auto& leaf : b.leaves) {
          const at::Tensor& x = got.at(leaf);
          parts.push_back(x.dim() == 3 ? x.reshape({H, H}).t() : x.reshape({H}));
        }
        v = at::cat(parts, 0);
        break;
      }
      case Kind::AttnOut: v = src.reshape({H, H}).t(); break;
      case Kind::Router: {
        const int M = cfg.moe.ensemble_size, per = cfg.moe.num_experts / M;
        const at::Tensor k3 = src.reshape({H, M, per});
        const auto& cols = layers.at(b.block)->router_column_ids(b.member);
        std::vector<int64_t> local;
        for (int id : cols) local.push_back(id - b.member * per);
        v = k3.select(1, b.member).index_select(1, at::tensor(local, at::kLong));
        break;
      }
      case Kind::Expert: v = src; break;
      case Kind::PosEmbed:
        v = src;
        if (src.size(1) != p->size(1)) {
          v = zoom_pos_embed(src, p->size(1));
          rep.zoomed = true;
        }
        break;
    }
    require(v.sizes() == p->sizes(), concat("vmoe checkpoint '", ck.prefix(), "': '", b.leaves[0], "' gives ", v.sizes(),
                                            " for ", b.param, ", the model has ", p->sizes()));
    p->copy_(v);
  }
  if (new_head) reset_head(model);
  return rep;
}

std::map<std::string, at::Tensor> vmoe_params(const VisionTransformer& model, Communicator& host) {
  at::NoGradGuard ng;
  const ModelConfig& cfg = model->config();
  const Table t = make_table(cfg);
  std::map<int, MoeLayer> layers;
  for (const auto& l : model->moe_layers()) layers.emplace(l->layer(), l);
  const int M = cfg.moe.ensemble_size, per = cfg.moe.num_experts / M;
  for (const auto& [block, l] : layers)
    for (int m = 0; m < M; ++m)
      require(static_cast<int>(l->router_column_ids(m).size()) == per,
              concat("vmoe export: MoE block ", block, " was pruned with prune.routing: drop, its router has no column ",
                     "for a pruned expert; vmoe's tree needs all ", cfg.moe.num_experts,
                     " (prune with prune.routing: zero to export, as the pruning paper's code does)"));
  const auto params = model->named_parameters();
  auto cpu = [](const at::Tensor& x) { return x.detach().to(at::kCPU).to(at::kFloat).contiguous(); };
  std::map<std::string, at::Tensor> out;
  const int64_t H = cfg.hidden, n = cfg.num_heads, d = H / n;
  std::map<std::string, std::vector<at::Tensor>> routers;  // leaf -> member columns
  for (const Binding& b : t.bindings) {
    const at::Tensor* p = params.find(b.param);
    TORCH_CHECK(p, "vmoe export: the model has no parameter ", b.param);
    if (b.kind == Kind::Expert) {
      // Every rank takes part; rank 0 receives the whole [E_l, ...] in id order.
      const at::Tensor full = gather_expert_param(model, b.param, host);
      if (host.rank() != 0) continue;
      const auto& ids = layers.at(b.block)->expert_ids();
      std::vector<int64_t> shape(full.sizes().begin(), full.sizes().end());
      shape[0] = cfg.moe.num_experts;
      at::Tensor all = at::zeros(shape, full.options());  // pruned experts: zeros
      all.index_copy_(0, at::tensor(std::vector<int64_t>(ids.begin(), ids.end()), at::kLong), full);
      out[b.leaves[0]] = cpu(all);
      continue;
    }
    if (host.rank() != 0) continue;
    const at::Tensor v = cpu(*p);
    switch (b.kind) {
      case Kind::Copy:
      case Kind::PosEmbed: out[b.leaves[0]] = v; break;
      case Kind::Transpose: out[b.leaves[0]] = v.t().contiguous(); break;
      case Kind::Conv: out[b.leaves[0]] = v.permute({2, 3, 1, 0}).contiguous(); break;
      case Kind::Qkv:
        for (size_t i = 0; i < 3; ++i) {
          const at::Tensor part = v.narrow(0, static_cast<int64_t>(i) * H, H);
          out[b.leaves[i]] = (v.dim() == 2 ? part.t().reshape({H, n, d}) : part.reshape({n, d})).contiguous();
        }
        break;
      case Kind::AttnOut: out[b.leaves[0]] = v.t().reshape({n, d, H}).contiguous(); break;
      case Kind::Router: routers[b.leaves[0]].push_back(v); break;
      case Kind::Expert: break;
    }
  }
  for (auto& [leaf, cols] : routers)
    out[leaf] = (M > 1 ? at::stack(cols, 1) : cols[0]).contiguous();  // (H, M, E/M) or (H, E)
  return out;
}

}  // namespace moeprune
