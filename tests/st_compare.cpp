// Test helper: compares tensors.
// usage: st_compare A B TOL
//   A, B safetensors files: every tensor of B against A's tensor of the same name;
//        prints the largest relative difference (max |a-b| / max |b| per tensor).
//   FILE::NAME for A and B: those two tensors only (relative, as above).
//   A, B .npy files: the largest absolute difference.
// Exit 0 when the difference is <= TOL, 1 otherwise (or on a missing tensor or a shape mismatch).
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/npy.h"
#include "core/safetensors.h"

namespace {

bool ends_with(const std::string& s, const std::string& t) {
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}

double relative(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor x = a.to(at::kDouble), y = b.to(at::kDouble);
  const double scale = std::max(y.abs().max().item<double>(), 1e-12);
  return (x - y).abs().max().item<double>() / scale;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: st_compare A B TOL\n");
    return 2;
  }
  const std::string A = argv[1], B = argv[2];
  const double tol = std::atof(argv[3]);
  if (ends_with(A, ".npy") && ends_with(B, ".npy")) {
    const at::Tensor a = moeprune::read_npy(A).to(at::kDouble), b = moeprune::read_npy(B).to(at::kDouble);
    if (a.sizes() != b.sizes()) {
      std::printf("shape differs: %s vs %s\n", c10::str(a.sizes()).c_str(), c10::str(b.sizes()).c_str());
      return 1;
    }
    const double d = (a - b).abs().max().item<double>();
    std::printf("max abs difference %.3e, tolerance %.1e\n", d, tol);
    return d <= tol ? 0 : 1;
  }
  const auto sep_a = A.find("::"), sep_b = B.find("::");
  if (sep_a != std::string::npos && sep_b != std::string::npos) {
    moeprune::SafetensorsFile a(A.substr(0, sep_a)), b(B.substr(0, sep_b));
    const std::string na = A.substr(sep_a + 2), nb = B.substr(sep_b + 2);
    if (!a.contains(na) || !b.contains(nb)) {
      std::printf("missing tensor: %s or %s\n", A.c_str(), B.c_str());
      return 1;
    }
    const at::Tensor x = a.view(na), y = b.view(nb);
    if (x.sizes() != y.sizes()) {
      std::printf("shape differs: %s vs %s\n", c10::str(x.sizes()).c_str(), c10::str(y.sizes()).c_str());
      return 1;
    }
    const double d = relative(x, y);
    std::printf("relative difference %.3e (%s vs %s), tolerance %.1e\n", d, na.c_str(), nb.c_str(), tol);
    return d <= tol ? 0 : 1;
  }
  moeprune::SafetensorsFile a(A), b(B);
  double worst = 0;
  std::string worst_name;
  for (const auto& [name, e] : b.entries()) {
    if (!a.contains(name)) {
      std::printf("missing in A: %s\n", name.c_str());
      return 1;
    }
    at::Tensor x = a.view(name), y = b.view(name);
    if (x.sizes() != y.sizes()) {
      std::printf("shape differs: %s\n", name.c_str());
      return 1;
    }
    const double d = relative(x, y);
    if (d > worst) {
      worst = d;
      worst_name = name;
    }
  }
  std::printf("largest relative difference %.3e (%s), tolerance %.1e\n", worst, worst_name.c_str(), tol);
  return worst <= tol ? 0 : 1;
}
