// See README.md: declarations only, enough for ProcessGroupGloo.hpp to parse.
#pragma once
#include <chrono>

namespace gloo {
class Context {
 public:
  // Only named by the inline ProcessGroupGloo::setTimeout, which the shim never calls.
  void setTimeout(std::chrono::milliseconds timeout);
};
} // namespace gloo
