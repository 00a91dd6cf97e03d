// SPDX-License-Identifier: Apache-2.0
// The file transport as a loadable plugin (uvd-transport-file.so).
#include "core/plugin.hpp"
#include "transports/file/file.hpp"

UVD_DEFINE_PLUGIN("file", &uvd::file::file_vstore_ops, nullptr)
