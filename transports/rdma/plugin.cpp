// SPDX-License-Identifier: Apache-2.0
// The rdma transport as a loadable plugin (uvd-transport-rdma.so): the "rdma"
// vstore_ops for clients, and the storage server's table for `uvd serve`,
// so that nothing else in uvd needs libibverbs or librdmacm to run.
#include "core/plugin.hpp"
#include "transports/rdma/net_rdma.hpp"
#include "transports/rdma/rdma.hpp"

UVD_DEFINE_PLUGIN("rdma", &uvd::rdma::rdma_vstore_ops, &uvd::rdma::rdma_net_veth_ops)

extern "C" __attribute__((visibility("default"))) const uvd::rdma::server_api* uvd_rdma_server_entry() {
  return uvd::rdma::server_entry();
}
