# SPDX-License-Identifier: Apache-2.0
# uvd_guest_test(NAME n [RDMA] [RDMA_PAIR] [GUESTS a b,daemon ...] [BINS file-or-folder ...]
#                [FEATURES f ...] [MODULES m ...] [PACKAGES p ...] [SCRIPT "shell" | SCRIPT_FILE f]
#                [TIMEOUT s] [MEM MiB] [LABELS l ...])
# A ctest that runs SCRIPT inside qemu guests (tests/e2e/guest/uvd-guest) with BINS copied in
# at their build paths, and passes when every guest's script exits 0. Results land in
# ${CMAKE_BINARY_DIR}/guest-runs/NAME/<guest>/ (console.log, script.log, files the script
# wrote to /out). BINS may be generator expressions ($<TARGET_FILE:t>); list their targets in
# DEPENDS so they are built first. MODULES and PACKAGES add kernel modules and Debian packages
# (uvd-guest --module/--package); SCRIPT_FILE runs a script file instead of SCRIPT. MEM is the
# guest's RAM (default 1024 MiB), which also holds the initramfs with BINS and the guest's
# /tmp: sanitizer builds of several binaries plus test images need more.
include_guard(GLOBAL)
# A cache entry, not a plain variable: include_guard(GLOBAL) skips this file in every
# directory after the first that includes it, and each of them needs the path.
set(UVD_GUEST_TOOL ${CMAKE_CURRENT_LIST_DIR}/uvd-guest CACHE INTERNAL "the guest harness command")

function(uvd_guest_test)
  cmake_parse_arguments(G "RDMA;RDMA_PAIR" "NAME;SCRIPT;SCRIPT_FILE;TIMEOUT;MEM" "GUESTS;BINS;FEATURES;MODULES;PACKAGES;LABELS;DEPENDS" ${ARGN})
  if(NOT G_TIMEOUT)
    set(G_TIMEOUT 300)
  endif()
  math(EXPR inner "${G_TIMEOUT} - 20")
  set(args run --out ${CMAKE_BINARY_DIR}/guest-runs/${G_NAME} --timeout ${inner})
  if(G_MEM)
    list(APPEND args --mem ${G_MEM})
  endif()
  if(G_RDMA)
    list(APPEND args --rdma)
  endif()
  if(G_RDMA_PAIR)
    list(APPEND args --rdma-pair)
  endif()
  foreach(f ${G_FEATURES})
    list(APPEND args --feature ${f})
  endforeach()
  foreach(m ${G_MODULES})
    list(APPEND args --module ${m})
  endforeach()
  foreach(p ${G_PACKAGES})
    list(APPEND args --package ${p})
  endforeach()
  foreach(g ${G_GUESTS})
    list(APPEND args --guest ${g})
  endforeach()
  foreach(b ${G_BINS})
    list(APPEND args --bin ${b})
  endforeach()
  find_package(Python3 COMPONENTS Interpreter REQUIRED)
  if(G_SCRIPT_FILE)
    list(APPEND args --script ${G_SCRIPT_FILE})
  else()
    list(APPEND args -c "${G_SCRIPT}")
  endif()
  add_test(NAME ${G_NAME} COMMAND ${Python3_EXECUTABLE} ${UVD_GUEST_TOOL} ${args})
  set_tests_properties(${G_NAME} PROPERTIES TIMEOUT ${G_TIMEOUT} LABELS "${G_LABELS}"
    ENVIRONMENT "UVD_PLUGIN_PATH=${UVD_PLUGIN_DIR};UVD_BUILD_DIR=${CMAKE_BINARY_DIR};UVD_SOURCE_DIR=${CMAKE_SOURCE_DIR}")
endfunction()
