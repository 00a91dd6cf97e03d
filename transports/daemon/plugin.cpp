// SPDX-License-Identifier: Apache-2.0
// The daemon transport as a loadable plugin (uvd-transport-daemon.so).
#include "core/plugin.hpp"
#include "transports/daemon/daemon.hpp"

UVD_DEFINE_PLUGIN("daemon", nullptr, &uvd::daemon::daemon_veth_ops)
