#!/usr/bin/env bash
# Build qaq-gguf's llama.cpp with the Vulkan backend beside the installed (CPU) package, for the Vulkan tests
# (tests/test_vulkan.py, pytest marker `vulkan`): libllama + libggml-vulkan (loaded by Python through
# QAQ_GGUF_LIB_DIR), test-backend-ops and qaq-test-backend-quant. Only these targets are built (no llama-server,
# no web UI); the build folder is kept, so a rerun with unchanged sources and patches takes seconds.
#
#   tools/vulkan_build.sh [BUILD_DIR]      # default: $QAQ_GGUF_CACHE/build-vulkan (~/.cache/qaq-gguf/build-vulkan)
#   eval "$(tools/vulkan_build.sh --env)"  # build, then export QAQ_GGUF_LIB_DIR, QAQ_VULKAN_BIN_DIR, GGML_VK_VISIBLE_DEVICES
#   python3 -m pytest -m vulkan tests
#
# Needs the Vulkan headers and loader, glslc and SPIR-V headers (Debian: libvulkan-dev glslc spirv-headers), and a
# Vulkan device to run on: on a CPU-only machine Mesa's software driver lavapipe (mesa-vulkan-drivers; bookworm's
# 22.3 compiles each flash-attention shader in 6-66 s, bookworm-backports' 25.x in about a second).
# Exit 3 (and a line saying what is missing) when the toolchain is not there.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
want_env=0
if [ "${1:-}" = "--env" ]; then want_env=1; shift; fi
cache="${QAQ_GGUF_CACHE:-$HOME/.cache/qaq-gguf}"
export CCACHE_DIR="${CCACHE_DIR:-$cache/ccache}"  # the one the package build and CI use
B=${1:-$cache/build-vulkan}

missing=()
command -v glslc >/dev/null 2>&1 || missing+=("glslc")
command -v cmake >/dev/null 2>&1 || missing+=("cmake")
command -v ninja >/dev/null 2>&1 || missing+=("ninja")
[ -f /usr/include/vulkan/vulkan.hpp ] || [ -n "${VULKAN_SDK:-}" ] || missing+=("the Vulkan headers (libvulkan-dev)")
[ -d /usr/include/spirv ] || [ -n "${VULKAN_SDK:-}" ] || missing+=("spirv-headers")
if [ ${#missing[@]} -gt 0 ]; then
    echo "vulkan_build: missing ${missing[*]} (Debian: apt install libvulkan-dev glslc spirv-headers mesa-vulkan-drivers)" >&2
    exit 3
fi

"$ROOT/tools/forget_moved_cmake_cache.sh" "$B" "$ROOT"  # configured from another checkout path
start=$(date +%s)
{
    cmake -S "$ROOT" -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_VULKAN=ON -DQAQ_BUILD_TEST_BACKEND_OPS=ON \
        -DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF
    cmake --build "$B" --target llama ggml-vulkan test-backend-ops qaq-test-backend-quant
} >&2
lib="$B/bin"  # llama.cpp puts its shared libraries there; our two test programs sit in $B
[ -f "$lib/libllama.so" ] || { echo "vulkan_build: no libllama.so in $lib after the build" >&2; exit 1; }
echo "vulkan_build: $B built in $(( $(date +%s) - start )) s (libraries in $lib)" >&2
if [ $want_env = 1 ]; then
    echo "export QAQ_GGUF_LIB_DIR='$lib' QAQ_VULKAN_BIN_DIR='$B' GGML_VK_VISIBLE_DEVICES=\${GGML_VK_VISIBLE_DEVICES:-0}"
fi
