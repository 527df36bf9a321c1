#include "core/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

namespace moeprune::log {
namespace {

int g_rank = 0;
bool g_verbose = false;

spdlog::logger& logger() {
  static std::shared_ptr<spdlog::logger> lg = [] {
    auto l = spdlog::stderr_color_mt("moeprune");
    l->set_pattern("[%H:%M:%S] [rank 0/1] %^%l%$: %v");
    l->set_level(spdlog::level::debug);
    l->flush_on(spdlog::level::debug);
    return l;
  }();
  return *lg;
}

}  // namespace

void init(int rank, int world_size, bool verbose) {
  g_rank = rank;
  g_verbose = verbose;
  logger().set_pattern("[%H:%M:%S] [rank " + std::to_string(rank) + "/" + std::to_string(world_size) +
                       "] %^%l%$: %v");
}

void debug(const std::string& msg) {
  if (g_rank == 0 && g_verbose) logger().debug(msg);
}
void info(const std::string& msg) {
  if (g_rank == 0) logger().info(msg);
}
void info_all(const std::string& msg) { logger().info(msg); }
void warn(const std::string& msg) { logger().warn(msg); }
void error(const std::string& msg) { logger().error(msg); }

}  // namespace moeprune::log
