// Small text helpers for messages.
#pragma once
#include <sstream>
#include <string>

namespace moeprune {

// The elements of a range, streamed, with sep between them: join({1, 3, 5}, ",") = "1,3,5".
template <class Range>
std::string join(const Range& items, const std::string& sep) {
  std::ostringstream out;
  bool first = true;
  for (const auto& x : items) {
    if (!first) out << sep;
    out << x;
    first = false;
  }
  return out.str();
}

}  // namespace moeprune
