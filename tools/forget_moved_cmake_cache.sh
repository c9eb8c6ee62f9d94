#!/usr/bin/env bash
# tools/forget_moved_cmake_cache.sh BUILD_DIR SOURCE_DIR
# A build folder configured from another source path (another checkout, a CI clone) would make CMake refuse to
# configure: drop its cache (CMakeCache.txt, CMakeFiles) and keep the compiled objects, which ninja and ccache reuse.
# Used by .ci/run (the package build) and tools/vulkan_build.sh.
set -euo pipefail
B=$1 SRC=$2
if [ -f "$B/CMakeCache.txt" ] && ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$SRC" "$B/CMakeCache.txt"; then
    rm -rf "$B/CMakeCache.txt" "$B/CMakeFiles"
fi
