// Test helper: compares every tensor of two safetensors files.
// usage: st_compare A B TOL -> prints the largest relative difference
// (max |a-b| / max |b| per tensor); exit 0 when it is <= TOL, 1 otherwise.
#include <cstdio>
#include <cstdlib>

#include "core/error.h"
#include "core/safetensors.h"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: st_compare A B TOL\n");
    return 2;
  }
  moeprune::SafetensorsFile a(argv[1]), b(argv[2]);
  const double tol = std::atof(argv[3]);
  double worst = 0;
  std::string worst_name;
  for (const auto& [name, e] : b.entries()) {
    if (!a.contains(name)) {
      std::printf("missing in A: %s\n", name.c_str());
      return 1;
    }
    at::Tensor x = a.view(name).to(at::kDouble), y = b.view(name).to(at::kDouble);
    if (x.sizes() != y.sizes()) {
      std::printf("shape differs: %s\n", name.c_str());
      return 1;
    }
    const double scale = std::max(y.abs().max().item<double>(), 1e-12);
    const double d = (x - y).abs().max().item<double>() / scale;
    if (d > worst) {
      worst = d;
      worst_name = name;
    }
  }
  std::printf("largest relative difference %.3e (%s), tolerance %.1e\n", worst, worst_name.c_str(), tol);
  return worst <= tol ? 0 : 1;
}
