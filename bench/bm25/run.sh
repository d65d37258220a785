#!/bin/sh
# bench/bm25/run.sh - slm.bm25 against minisearch (npm) on the same 10,000
# Russian and English support passages and ~200 questions, in one run.
#
#   bench/bm25/run.sh                      # 5 rounds
#   SLM_BENCH_ROUNDS=9 bench/bm25/run.sh
#   SLM_BUILD=/tmp/b SLM_BUILD_JIT=/tmp/b-jit SLM_BENCH_DATA=/tmp/d bench/bm25/run.sh
#
# Generates the passages and questions (gen_data.lua, deterministic, no
# downloads), then runs rounds in which lua-slm under Lua 5.4, minisearch
# under node and lua-slm under LuaJIT (when luajit is installed) each build
# the index and answer every question, one process right after the other
# (the order reversed every other round), so that the shared VM's changes
# of speed land on all of them alike;
# report.lua prints every round, the ratios' median and spread, and how
# much the top 5 of the two agree.  Not a test: nothing here gates CI.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${SLM_BUILD:-$root/build}
jitbuild=${SLM_BUILD_JIT:-$root/build-jit}
data=${SLM_BENCH_DATA:-$build/bench-bm25}
rounds=${SLM_BENCH_ROUNDS:-5}
lpath="$root/lua/?.lua;$root/lua/?/init.lua;;"

"$root/bin/setup-deps" --bench
"$root/bin/build" "$build"
jit=""
if command -v luajit >/dev/null; then
  "$root/bin/build" "$jitbuild" -DSLM_LUA=luajit
  jit=1
fi
# minisearch, exactly the version package-lock.json pins
if [ ! -f "$here/node_modules/minisearch/package.json" ]; then
  (cd "$here" && npm ci --no-audit --no-fund >/dev/null)
fi

LUA_PATH="$lpath" LUA_CPATH="$build/?.so;;" lua5.4 "$here/gen_data.lua" "$data"
results="$data/results.jsonl"
: > "$results"
echo "machine: $(nproc) cores, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1); node $(node --version); minisearch $(node -p 'require("'"$here"'/node_modules/minisearch/package.json").version'); $(lua5.4 -v 2>&1 | cut -d' ' -f1-2)${jit:+; $(luajit -v | cut -d' ' -f1-2)}" >&2
slm() { LUA_PATH="$lpath" LUA_CPATH="$build/?.so;;" lua5.4 "$here/bench.lua" "$data" "slm $1" >> "$results"; }
peer() { (cd "$here" && node --expose-gc bench.mjs "$data" "minisearch $1") >> "$results"; }
slmjit() {
  [ -z "$jit" ] || LUA_PATH="$lpath" LUA_CPATH="$jitbuild/?.so;;" luajit "$here/bench.lua" "$data" "slm-jit $1" >> "$results"
}
# odd rounds: Lua 5.4, node, LuaJIT; even rounds: LuaJIT, node, Lua 5.4
for r in $(seq "$rounds"); do
  echo "round $r..." >&2
  if [ $((r % 2)) = 1 ]; then slm "$r"; peer "$r"; slmjit "$r"; else slmjit "$r"; peer "$r"; slm "$r"; fi
done
LUA_PATH="$lpath" lua5.4 "$here/report.lua" "$data"
