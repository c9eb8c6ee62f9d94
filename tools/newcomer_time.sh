#!/usr/bin/env bash
# Time README command 1 as a newcomer runs it: a fresh clone of this checkout, a fresh venv, empty pip and qaq-gguf
# caches, no ccache. Prints install and demo seconds; logs and the demo's output stay under $WORK (default /tmp/nc).
#   tools/newcomer_time.sh            # about 15 minutes on 2 cores
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/nc}
rm -rf "$WORK" && mkdir -p "$WORK" && cd "$WORK"
git clone -q "$REPO" repo && cd repo
python3 -m venv "$WORK/venv" && . "$WORK/venv/bin/activate"
export QAQ_GGUF_CACHE="$WORK/cache" PIP_CACHE_DIR="$WORK/pipcache" CCACHE_DISABLE=1
export SKBUILD_BUILD_DIR="$WORK/build"  # kept, for the compile's breakdown (ninja log)
t0=$(date +%s)
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip install -v ".[demo]" > "$WORK/install.log" 2>&1 || { echo "install failed: $WORK/install.log"; exit 1; }
t1=$(date +%s)
cd "$WORK" && qaq-gguf demo --threads 2 > "$WORK/demo.log" 2>&1 || { echo "demo failed: $WORK/demo.log"; exit 1; }
t2=$(date +%s)
echo "install $((t1-t0)) s, demo $((t2-t1)) s, total $((t2-t0)) s (logs in $WORK)"
# where the compile went: seconds of job time per llama.cpp directory (jobs run in parallel: not wall time)
awk 'NR>1{d[$4]=$2-$1} END{for(k in d){t=k; sub(/\/CMakeFiles\/.*/,"",t); s[t]+=d[k]; tot+=d[k]}
     for(t in s) if (s[t] > 0.02*tot) printf "  %6.1f s  %s\n", s[t]/1000, t; printf "  %6.1f s  all jobs\n", tot/1000}' \
    "$WORK/build/.ninja_log" | sort -rn
