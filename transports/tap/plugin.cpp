// SPDX-License-Identifier: Apache-2.0
// The tap transport as a loadable plugin (uvd-transport-tap.so).
#include "core/plugin.hpp"
#include "transports/tap/tap.hpp"

UVD_DEFINE_PLUGIN("tap", nullptr, &uvd::tap::tap_veth_ops)
