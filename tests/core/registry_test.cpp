// SPDX-License-Identifier: Apache-2.0
#include "core/registry.hpp"

#include <gtest/gtest.h>

#include <cstddef>

#include "transports/memory/memory.hpp"

using namespace uvd::core;

TEST(Registry, FindsABuiltinByName) {
  registry reg;
  ASSERT_TRUE(reg.add_vstore(uvd::memory::memory_vstore_ops));
  auto ops = reg.vstore("memory");
  ASSERT_TRUE(ops);
  EXPECT_STREQ((*ops)->name, "memory");
  EXPECT_FALSE(reg.veth("memory"));
}

TEST(Registry, UnknownTransportNamesWhatExists) {
  registry reg;
  ASSERT_TRUE(reg.add_vstore(uvd::memory::memory_vstore_ops));
  auto ops = reg.vstore("carrier-pigeon");
  ASSERT_FALSE(ops);
  EXPECT_EQ(ops.err().errnum(), ENOENT);
  EXPECT_NE(ops.err().message.find("carrier-pigeon"), std::string::npos);
  EXPECT_NE(ops.err().message.find("memory"), std::string::npos);
}

TEST(Registry, RefusesATableMissingARequiredOp) {
  registry reg;
  vstore_ops t = uvd::memory::memory_vstore_ops;
  t.name = "nosubmit";
  t.submit = nullptr;
  auto r = reg.add_vstore(t);
  ASSERT_FALSE(r);
  EXPECT_NE(r.err().message.find("'submit'"), std::string::npos) << r.err().message;
}

TEST(Registry, RefusesANewerAbi) {
  registry reg;
  vstore_ops t = uvd::memory::memory_vstore_ops;
  t.abi_version = VSTORE_ABI_VERSION + 1;
  auto r = reg.add_vstore(t);
  ASSERT_FALSE(r);
  EXPECT_NE(r.err().message.find("ABI"), std::string::npos);
}

TEST(Registry, OlderSmallerTableIsZeroFilled) {
  registry reg;
  vstore_ops t = uvd::memory::memory_vstore_ops;
  t.name = "older";
  // Built before `poll` existed: whatever lies there must not be used.
  t.struct_size = offsetof(vstore_ops, poll);
  t.poll = reinterpret_cast<int (*)(void*, uint32_t)>(0x1);
  ASSERT_TRUE(reg.add_vstore(t));
  auto ops = reg.vstore("older");
  ASSERT_TRUE(ops);
  EXPECT_EQ((*ops)->poll, nullptr);
  EXPECT_NE((*ops)->submit, nullptr);
}

TEST(Registry, LoadsAPluginFromThePath) {
  registry reg;
  reg.add_plugin_dir(UVD_TEST_PLUGIN_DIR);
  auto ops = reg.vstore("memplug");
  ASSERT_TRUE(ops) << ops.err().what();
  EXPECT_STREQ((*ops)->name, "memplug");
  bool listed = false;
  for (const auto& t : reg.list())
    if (t.name == "memplug") listed = t.storage && t.origin.find("uvd-transport-memplug.so") != std::string::npos;
  EXPECT_TRUE(listed);
}

TEST(Registry, PluginWithAMissingSystemLibraryIsNamed) {
  registry reg;
  reg.add_plugin_dir(UVD_TEST_PLUGIN_DIR);
  auto ops = reg.vstore("needsdep");
  ASSERT_FALSE(ops);
  EXPECT_EQ(ops.err().errnum(), ELIBACC);
  EXPECT_NE(ops.err().message.find("uvd-transport-needsdep.so"), std::string::npos) << ops.err().message;
  EXPECT_NE(ops.err().message.find("libuvd_absent_dep.so"), std::string::npos) << ops.err().message;
  EXPECT_NE(ops.err().message.find("missing"), std::string::npos) << ops.err().message;
  // The listing shows it as unavailable, with the reason.
  bool shown = false;
  for (const auto& t : reg.list())
    if (t.name == "needsdep") shown = t.description.find("libuvd_absent_dep.so") != std::string::npos;
  EXPECT_TRUE(shown);
}

TEST(Registry, RefusesAFileThatIsNotAPlugin) {
  registry reg;
  auto r = reg.load_plugin("/proc/self/status");
  ASSERT_FALSE(r);
  EXPECT_NE(r.err().message.find("/proc/self/status"), std::string::npos);
}
