#!/usr/bin/env bash
# Compile what the qaq CUDA code touches for sm_90a with ptxas diagnostics as errors (spills, local memory), no GPU
# needed: the patched llama.cpp's ggml-cuda files that include native/ggml/ggml-qaq.cuh (convert, cpy, getrows,
# set-rows) and one flash-attention vector instance of a qaq pair. Keeps ptxas's per-kernel resource lines (registers,
# stack, spills) for the qaq kernels in docs/results/cuda-ptxas/.
#
#   tools/cuda_compile_check.sh [FILE.cu ...]   # default: the list below; paths relative to ggml/src/ggml-cuda
# Env: LLAMA_SRC (the patched tree; default the newest ~/.cache/qaq-gguf/src/llama.cpp-*), NVCC, CUDA_ARCH (sm_90a),
#      OUT (docs/results/cuda-ptxas), QAQ_GGML (native/ggml).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LLAMA_SRC=${LLAMA_SRC:-$(ls -dt "${QAQ_GGUF_CACHE:-$HOME/.cache/qaq-gguf}"/src/llama.cpp-* 2>/dev/null | head -1)}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
ARCH=${CUDA_ARCH:-sm_90a}
OUT=${OUT:-$ROOT/docs/results/cuda-ptxas}
QAQ_GGML=${QAQ_GGML:-$ROOT/native/ggml}  # another copy of native/ggml, e.g. to compare before/after a change
[ -d "$LLAMA_SRC/ggml/src/ggml-cuda" ] || { echo "no patched llama.cpp tree (set LLAMA_SRC; the build extracts it)" >&2; exit 2; }
grep -q ggml-qaq.cuh "$LLAMA_SRC/ggml/src/ggml-cuda/dequantize.cuh" || { echo "$LLAMA_SRC is not patched (patches/0008)" >&2; exit 2; }
CU=$LLAMA_SRC/ggml/src/ggml-cuda
FILES=("$@")
[ ${#FILES[@]} -gt 0 ] || FILES=(template-instances/fattn-vec-instance-qaq3-qaq3.cu set-rows.cu cpy.cu getrows.cu convert.cu)
mkdir -p "$OUT"
STUB=()
echo '#include <cublas_v2.h>' | "$NVCC" -x cu -E - -o /dev/null 2>/dev/null || STUB=(-I"$ROOT/tools/cuda-stub")
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
status=0
for f in "${FILES[@]}"; do
    name=$(basename "$f" .cu)
    start=$(date +%s)
    if "$NVCC" -std=c++17 -arch="$ARCH" -O3 -use_fast_math -extended-lambda -DGGML_USE_CUDA -DGGML_CUDA_USE_GRAPHS \
        "${STUB[@]}" -I"$QAQ_GGML" -I"$CU" -I"$LLAMA_SRC/ggml/src" -I"$LLAMA_SRC/ggml/include" \
        -Xptxas -v,-warn-spills,-warn-lmem-usage,--warning-as-error -Werror all-warnings \
        -c "$CU/$f" -o "$tmp/$name.o" > "$tmp/$name.log" 2>&1; then rc=0; else rc=$?; status=1; fi
    secs=$(( $(date +%s) - start ))
    # keep the resource lines of the kernels with qaq in their (mangled) name, or all of them for a qaq FA instance
    { echo "# $f for $ARCH, nvcc $("$NVCC" --version | tail -1), $secs s, exit $rc"
      awk -v all="$([[ $name == *qaq* ]] && echo 1 || echo 0)" '
          /Compiling entry function/ { keep = all || tolower($0) ~ /qaq/; if (keep) print; next }
          /Function properties for/ { fp = all || tolower($0) ~ /qaq/; next }
          keep && /(registers|stack frame|spill)/ { print }
          /error|warning/ { print }' "$tmp/$name.log"
    } > "$OUT/$name.txt"
    echo "$f: exit $rc, $secs s, $(grep -c 'Compiling entry' "$OUT/$name.txt") qaq kernels -> ${OUT#$ROOT/}/$name.txt"
    [ $rc -eq 0 ] || tail -20 "$tmp/$name.log"
done
exit $status
