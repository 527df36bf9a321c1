// Named ranges in profiler traces (`--profile` of moeprune-bench, torch's profiler):
// free when no profiler is on. bench/step_phases.py reads them to split a training
// step by phase.
#pragma once
#include <ATen/record_function.h>

#include <optional>

namespace moeprune {

class TraceRange {
 public:
  explicit TraceRange(const char* name) { begin(name); }
  // Ends the current range and starts the next one.
  void next(const char* name) {
    range_.reset();
    begin(name);
  }
  void end() { range_.reset(); }

 private:
  void begin(const char* name) {
    range_.emplace(at::RecordScope::USER_SCOPE);
    if (range_->isActive()) range_->before(name);
  }
  std::optional<at::RecordFunction> range_;
};

}  // namespace moeprune
