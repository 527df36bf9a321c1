#include "core/error.h"

namespace moeprune {

void require(bool cond, const std::string& message) {
  if (!cond) throw UserError(message);
}

}  // namespace moeprune
