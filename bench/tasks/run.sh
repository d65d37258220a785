#!/usr/bin/env bash
# bench/tasks/run.sh: the task layer's overhead: CPU per slm.classify call
# against a bare client:chat carrying the same request (goal: at most
# 1.2x), against the local simulator.  Ratios, in one run; never gates CI.
#   bench/tasks/run.sh            env: BENCH_N (2000), BENCH_ROUNDS (5)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd -P)
root=$(cd "$here/../.." && pwd -P)
cd "$root"
bin/build build-bench -DSLM_WERROR=OFF
export LUA_PATH="$root/lua/?.lua;$root/lua/?/init.lua;$root/?.lua;;" LUA_CPATH="$root/build-bench/?.so;;"
out=$(lua5.4 tests/upstream/launch.lua start)
url=$(echo "$out" | sed -n 1p); prefix=$(echo "$out" | sed -n 2p)
trap 'lua5.4 tests/upstream/launch.lua stop "$prefix" >/dev/null 2>&1' EXIT
line=$(lua5.4 "$here/classify_bench.lua" "$url")
echo "$line"
echo "$line" | awk '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } }
  END { printf "slm.classify CPU per call: %s us, bare client:chat with the same request: %s us -> %.2fx (goal <= 1.2x: %s)\n",
        v["task_us"], v["bare_us"], v["ratio"], (v["ratio"] <= 1.2 ? "met" : "MISSED") }'
