// Settings read from the environment (MOEPRUNE_KERNELS, MOEPRUNE_EXPERT_GEMM, ...).
#pragma once
#include <cstdlib>
#include <string>
#include <vector>

#include "core/error.h"

namespace moeprune {

// The index in `choices` of environment variable `name` (unset or empty: 0).
// Anything else is a UserError: "NAME='v': expected a, b or c".
inline int env_choice(const char* name, const std::vector<std::string>& choices) {
  const char* env = std::getenv(name);
  const std::string v = env ? env : "";
  if (v.empty()) return 0;
  for (size_t i = 0; i < choices.size(); ++i)
    if (v == choices[i]) return static_cast<int>(i);
  std::string expected;
  for (size_t i = 0; i < choices.size(); ++i)
    expected += (i == 0 ? "" : i + 1 == choices.size() ? " or " : ", ") + choices[i];
  throw UserError(concat(name, "='", v, "': expected ", expected));
}

}  // namespace moeprune
