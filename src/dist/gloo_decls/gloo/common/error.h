// See README.md: declarations only, enough for ProcessGroupGloo.hpp to parse.
#pragma once
