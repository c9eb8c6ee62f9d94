#!/usr/bin/env bash
# CI gate for our CUDA code without a GPU: compile what the qaq types touch in the patched llama.cpp for sm_90a and
# compare ptxas's per-kernel resources (registers, stack frame, spill bytes) with the committed baseline.
#
#   tools/cuda_compile_check.sh [--update] [FILE.cu ...]   # FILE relative to ggml/src/ggml-cuda; default list below
#
# Two kinds of file:
#  - set-rows.cu, cpy.cu, getrows.cu, convert.cu (the files that include native/ggml/ggml-qaq.cuh directly): all
#    warnings are errors, ptxas's spill and local-memory warnings included; they compile clean today.
#  - one flash-attention vector instance per qaq and tcq type, the diagonal pairs fattn-vec-instance-X-X.cu (each
#    type's K and V decoders compiled into the FA kernels): front-end warnings are errors; ptxas's figures are
#    compared with docs/results/cuda-ptxas/NAME.txt. Their 2-column kernels have 40-80 byte stack frames, as
#    upstream's own q4_0-q4_0 instance has, and the 3-bit types' head-256 kernels small spills (ours: q4_0's have
#    none; docs/results/cuda-ptxas/README.md), so "no local memory" cannot be the rule there; the rule is "no worse
#    than the baseline".
# Fails (exit 1) when a file does not compile, a kernel's spill stores/loads or stack frame grow (a new kernel counts
# from 0: one that spills or has a stack frame fails), or a file has no baseline. Register changes, improvements,
# new or gone kernels are reported without failing. --update writes the new figures as the baseline (commit them).
# Exit 2: no nvcc or no patched tree.
#
# Time (2-core AMD EPYC VM shared with other jobs, nvcc 13.0): 232-242 s cold for the first 12 files (9-16 s each
# for the four, 16-28 s per qaq FA instance); the two tcq FA instances add about 80 s each (Intel Xeon VM, 2 cores);
# 1 s with a warm ccache: `ccache nvcc` is used when ccache >= 4 is on PATH
# (CCACHE=off disables it), CCACHE_DIR defaulting to ~/.cache/qaq-gguf/ccache as in .ci/run, compiler_check
# "%compiler% --version". A change to native/ggml or to the patched tree misses the cache for the files it touches.
# Env: LLAMA_SRC (the patched tree; default the newest ~/.cache/qaq-gguf/src/llama.cpp-*), NVCC, CUDA_ARCH (sm_90a),
#      BASELINE (docs/results/cuda-ptxas), OUT (the new figures; default build/cuda-ptxas), QAQ_GGML (native/ggml:
#      another copy, e.g. to compare before/after a change), CCACHE.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${QAQ_GGUF_CACHE:-$HOME/.cache/qaq-gguf}
LLAMA_SRC=${LLAMA_SRC:-$(ls -dt "$CACHE"/src/llama.cpp-* 2>/dev/null | head -1)}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
ARCH=${CUDA_ARCH:-sm_90a}
BASELINE=${BASELINE:-$ROOT/docs/results/cuda-ptxas}
OUT=${OUT:-$ROOT/build/cuda-ptxas}
QAQ_GGML=${QAQ_GGML:-$ROOT/native/ggml}
UPDATE=0
if [ "${1:-}" = --update ]; then UPDATE=1; shift; fi
[ -x "$NVCC" ] || { echo "no nvcc (set NVCC)" >&2; exit 2; }
[ -d "$LLAMA_SRC/ggml/src/ggml-cuda" ] || { echo "no patched llama.cpp tree (set LLAMA_SRC; the build extracts it)" >&2; exit 2; }
grep -q ggml-qaq.cuh "$LLAMA_SRC/ggml/src/ggml-cuda/dequantize.cuh" || { echo "$LLAMA_SRC is not patched (patches/0008)" >&2; exit 2; }
CU=$LLAMA_SRC/ggml/src/ggml-cuda
FILES=("$@")
if [ ${#FILES[@]} -eq 0 ]; then
    FILES=(set-rows.cu cpy.cu getrows.cu convert.cu)
    for t in qaq3 qaq2 qaq4l qaq3l qaq2l qaq4h qaq3h qaq2h tcq3 tcq2; do FILES+=("template-instances/fattn-vec-instance-$t-$t.cu"); done
fi
LAUNCH=()
if [ "${CCACHE:-}" != off ] && command -v "${CCACHE:-ccache}" >/dev/null 2>&1 && \
   [ "$("${CCACHE:-ccache}" --version | sed -n '1s/.*version \([0-9]*\).*/\1/p')" -ge 4 ] 2>/dev/null; then
    LAUNCH=("${CCACHE:-ccache}")
    export CCACHE_DIR=${CCACHE_DIR:-$CACHE/ccache}
    export CCACHE_COMPILERCHECK=${CCACHE_COMPILERCHECK:-%compiler% --version}  # nvcc may be a wrapper script
fi
NVCC_VERSION=$("$NVCC" --version | tail -1)
mkdir -p "$OUT"
STUB=()
echo '#include <cublas_v2.h>' | "$NVCC" -x cu -E - -o /dev/null 2>/dev/null || STUB=(-I"$ROOT/tools/cuda-stub")
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

# "name stack spill_stores spill_loads registers" per entry function of a resource file; the hashes in the names of
# internal-linkage functions (_INTERNAL_<hash>_<n>_file_cu_<hash>, which vary with the source) zeroed
summarize() {
    sed -E 's/_INTERNAL_[0-9a-f]{8}_([0-9]+_[A-Za-z0-9_]+_cu)_[0-9a-f]{8}/_INTERNAL_00000000_\1_00000000/g' "$1" | awk '/Compiling entry function/ { split($0, q, "'\''"); cur = q[2]; got = 0; next }
         cur != "" && !got && /bytes stack frame/ { st = $1; ss = $5; sl = $9; got = 1; next }
         cur != "" && /Used [0-9]+ registers/ { for (i = 1; i < NF; i++) if ($(i + 1) == "registers,") r = $i
                                                 print cur, (got ? st : 0), (got ? ss : 0), (got ? sl : 0), r; cur = "" }'
}
demangle() { if command -v c++filt >/dev/null; then c++filt -p "$1"; else echo "$1"; fi; }

status=0
total_start=$(date +%s)
for f in "${FILES[@]}"; do
    name=$(basename "$f" .cu)
    if [[ $name == fattn-* ]]; then
        ptxas=(-Xptxas -v); kind="FA instance: ptxas figures against the baseline"
    else
        ptxas=(-Xptxas -v,-warn-spills,-warn-lmem-usage,--warning-as-error); kind="ptxas spill/local-memory warnings as errors"
    fi
    start=$(date +%s)
    if "${LAUNCH[@]}" "$NVCC" -std=c++17 -arch="$ARCH" -O3 -use_fast_math -extended-lambda -DGGML_USE_CUDA \
        -DGGML_CUDA_USE_GRAPHS "${STUB[@]}" -I"$QAQ_GGML" -I"$CU" -I"$LLAMA_SRC/ggml/src" -I"$LLAMA_SRC/ggml/include" \
        "${ptxas[@]}" -Werror all-warnings -c "$CU/$f" -o "$tmp/$name.o" > "$tmp/$name.log" 2>&1; then rc=0; else rc=$?; fi
    secs=$(( $(date +%s) - start ))
    # the resource lines of the kernels with qaq or tcq in their (mangled) name, or of all kernels of an FA instance
    { echo "# $f for $ARCH, $NVCC_VERSION, all warnings as errors, $kind"
      awk -v all="$([[ $name == fattn-* ]] && echo 1 || echo 0)" '
          /Compiling entry function/ { keep = all || tolower($0) ~ /qaq|tcq/; if (keep) print; next }
          keep && /(registers|stack frame|spill)/ { print }
          /error|warning/ { print }' "$tmp/$name.log"
    } > "$OUT/$name.txt"
    n=$(grep -c 'Compiling entry' "$OUT/$name.txt" || true)
    if [ $rc -ne 0 ]; then
        echo "FAIL $f: nvcc exit $rc ($secs s)"; tail -20 "$tmp/$name.log"; status=1; continue
    fi
    echo "$f: compiled, $secs s, $n kernels -> ${OUT#$ROOT/}/$name.txt"
    base=$BASELINE/$name.txt
    if [ ! -f "$base" ]; then
        if [ $UPDATE -eq 1 ]; then cp "$OUT/$name.txt" "$base"; echo "  baseline written: $base"
        else echo "FAIL $f: no baseline $base (run with --update and commit it)"; status=1; fi
        continue
    fi
    head -1 "$base" | grep -qF "$NVCC_VERSION" || echo "  note: baseline from another nvcc: $(head -1 "$base")"
    summarize "$base" > "$tmp/$name.base"
    summarize "$OUT/$name.txt" > "$tmp/$name.new"
    if ! awk 'NR == FNR { b[$1] = $0; next }
              { k = $1; if (k in b) { split(b[k], o, " "); delete b[k] } else { o[2] = o[3] = o[4] = 0; o[5] = "none" }
                grew = ($2 > o[2]) || ($3 > o[3]) || ($4 > o[4])
                what = sprintf("stack %s->%s B, spill stores %s->%s B, loads %s->%s B, registers %s->%s", \
                               o[2], $2, o[3], $3, o[4], $4, o[5], $5)
                if (grew) { print "FAIL", k, what; bad = 1 }
                else if (o[5] == "none") print "new ", k, what
                else if ($2 < o[2] || $3 < o[3] || $4 < o[4]) print "less", k, what " (--update to keep)"
                else if ($5 != o[5]) print "regs", k, what }
              END { for (k in b) print "gone", k; exit bad }' "$tmp/$name.base" "$tmp/$name.new" > "$tmp/$name.cmp"; then
        status=1
    fi
    while read -r tag k rest; do
        echo "  $tag $(demangle "$k") $rest"
    done < "$tmp/$name.cmp"
    [ $UPDATE -eq 0 ] || cp "$OUT/$name.txt" "$base"
done
echo "$([ $status -eq 0 ] && echo PASS || echo FAIL): ${#FILES[@]} files in $(( $(date +%s) - total_start )) s" \
     "(${LAUNCH[*]:-no ccache}${LAUNCH:+, CCACHE_DIR=$CCACHE_DIR})"
exit $status
