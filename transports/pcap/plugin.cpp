// SPDX-License-Identifier: Apache-2.0
// The pcap transport as a loadable plugin (uvd-transport-pcap.so).
#include "core/plugin.hpp"
#include "transports/pcap/pcap.hpp"

UVD_DEFINE_PLUGIN("pcap", nullptr, &uvd::pcap::pcap_veth_ops)
