#!/usr/bin/env bash
# Compile the qaq sections of a patched tree's ggml-metal kernels/dequantize.h and kernels/quantize.h as C++ (shim.h
# stands in for MSL) and compare them with the C reference (native/ggml/ggml-qaq.c), block by block. No Mac needed;
# checks the port's logic and bit layout, not MSL syntax or GPU floating point (docs/metal.md).
#   tools/metal_shim/run.sh LLAMA_TREE [NBLOCKS] [extra g++ flags, e.g. -ffp-contract=fast -mfma]
set -euo pipefail
tree=${1:?usage: run.sh LLAMA_TREE [NBLOCKS] [CXXFLAGS...]}; n=${2:-20000}; shift $(( $# < 2 ? $# : 2 ))
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../.." && pwd)
k=$tree/ggml/src/ggml-metal/kernels
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
# from the qaq3/qaq2 section to the line before dequantize_iq4_xs's template line; the qaq quantizers up to quantize_tq2_0
awk '/^\/\/ qaq3 \/ qaq2: sub-4-bit/{on=1} /^void dequantize_iq4_xs/{exit} on{buf[++n]=$0} END{for(i=1;i<n;i++) print buf[i]}' "$k/dequantize.h" > "$out/deq_qaq.inc"
awk '/^\/\/ qaq3 \/ qaq2, /{on=1} /^void quantize_tq2_0/{exit} on' "$k/quantize.h" > "$out/q_qaq.inc"
cp "$here/shim.h" "$here/check.cpp" "$out/"
gcc -O2 -ffp-contract=off -c -I"$root/native/ggml" "$root/native/ggml/ggml-qaq.c" -o "$out/ggml-qaq.o"
g++ -std=c++17 -O2 -ffp-contract=off -Wall -Wno-unknown-pragmas -Wno-unused-function "$@" "$out/check.cpp" "$out/ggml-qaq.o" -o "$out/check"
"$out/check" "$n"
