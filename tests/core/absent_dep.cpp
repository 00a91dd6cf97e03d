// SPDX-License-Identifier: Apache-2.0
// A shared library that exists at build time only in a folder the test plugin
// does not search, standing for a system library missing on the host.
extern "C" int uvd_absent_dep_value() { return 42; }
