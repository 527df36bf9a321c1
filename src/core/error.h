// Error types and exit codes shared by every module. A UserError is something the
// person running moeprune can fix (config, input files, world size): it is printed
// as one line and ends the job with exit code 2, on every rank.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace moeprune {

inline constexpr int kExitOk = 0;
inline constexpr int kExitInternal = 1;
inline constexpr int kExitUserError = 2;
// Training diverged: a non-finite gradient norm (every rank agrees on it); stopped
// before that step changed the weights, nothing of it saved.
inline constexpr int kExitDiverged = 3;
// Preempted (SIGTERM or SIGUSR1): every rank saved a checkpoint and exited; rerun
// the same command with --resume auto to continue (sysexits EX_TEMPFAIL).
inline constexpr int kExitPreempted = 75;

// Concatenates anything streamable; the project's one string formatter (torch's
// fmt and Debian's fmt differ, so neither is used across modules).
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

class UserError : public std::runtime_error {
 public:
  explicit UserError(const std::string& what) : std::runtime_error(what) {}
};

// Raised identically on every rank (the all-reduced gradient norm is not finite).
class DivergedError : public std::runtime_error {
 public:
  explicit DivergedError(const std::string& what) : std::runtime_error(what) {}
};

// Throws UserError(message) when cond is false.
void require(bool cond, const std::string& message);

}  // namespace moeprune
