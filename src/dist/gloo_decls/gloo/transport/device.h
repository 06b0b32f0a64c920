// See README.md: declarations only, enough for ProcessGroupGloo.hpp to parse.
#pragma once

namespace gloo {
namespace transport {
class Device;
class UnboundBuffer {
 public:
  virtual ~UnboundBuffer();
};
} // namespace transport
} // namespace gloo
