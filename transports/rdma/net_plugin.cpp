// SPDX-License-Identifier: Apache-2.0
// The switch side of net over RDMA leaves the rdma plugin through this one
// extra symbol (`uvd switch --rdma` dlopens the plugin and asks for it).
#include "transports/rdma/net_rdma.hpp"

extern "C" __attribute__((visibility("default"))) const uvd::rdma::net_api* uvd_rdma_net_entry() {
  return uvd::rdma::net_entry();
}
