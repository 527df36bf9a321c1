// Logging front end (spdlog behind it). Rank 0 logs info and debug; every rank
// logs warnings and errors. Every line carries a "[rank r/W]" prefix. This header
// has no fmt or spdlog in it so torch translation units can include it.
#pragma once
#include <string>

namespace moeprune::log {

// Call once after the rank is known; before that, lines print as rank 0/1.
void init(int rank, int world_size, bool verbose = false);
void debug(const std::string& msg);
void info(const std::string& msg);
void warn(const std::string& msg);
void error(const std::string& msg);
// Info from every rank, not only rank 0 (per-rank figures).
void info_all(const std::string& msg);

}  // namespace moeprune::log
