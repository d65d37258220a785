#!/bin/sh
# bench/batch/csv/run.sh - parse throughput (MB/s) of slm.csv.reader
# against csv-parse (npm, the version package-lock.json pins) on the same
# generated 50 MB CSV of support tickets with quoted multi-line fields.
#
#   bench/batch/csv/run.sh                        # 7 rounds, 50 MB
#   SLM_BENCH_ROUNDS=11 SLM_BENCH_MB=200 bench/batch/csv/run.sh
#
# Generates the file (gen.lua, deterministic, no downloads), reads it once
# so that it is in the page cache, then runs rounds in which lua-slm under
# Lua 5.4, csv-parse under node and lua-slm under LuaJIT (when installed)
# each parse the whole file in a process of their own, one right after the
# other (the order reversed every other round), so that the machine's
# changes of speed land on all of them alike; report.lua prints every
# round, the median and the spread, and checks that all of them counted
# the same records, fields and bytes. Not a test: nothing here gates CI.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
build=${SLM_BUILD:-$root/build}
jitbuild=${SLM_BUILD_JIT:-$root/build-jit}
data=${SLM_BENCH_DATA:-$build/bench-csv}
rounds=${SLM_BENCH_ROUNDS:-7}
mb=${SLM_BENCH_MB:-50}
lpath="$root/lua/?.lua;$root/lua/?/init.lua;;"

"$root/bin/setup-deps" --bench
"$root/bin/build" "$build"
jit=""
if command -v luajit >/dev/null; then
  "$root/bin/build" "$jitbuild" -DSLM_LUA=luajit
  jit=1
fi
# csv-parse, exactly the version package-lock.json pins
if [ ! -f "$here/node_modules/csv-parse/package.json" ]; then
  (cd "$here" && npm ci --no-audit --no-fund >/dev/null)
fi

mkdir -p "$data"
csv="$data/tickets-$mb.csv"
[ -f "$csv" ] || lua5.4 "$here/gen.lua" "$csv" "$mb"
cat "$csv" > /dev/null
results="$data/results.jsonl"
: > "$results"
echo "machine: $(nproc) cores, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1); node $(node --version); csv-parse $(node -p 'require("'"$here"'/node_modules/csv-parse/package.json").version'); $(lua5.4 -v 2>&1 | cut -d' ' -f1-2)${jit:+; $(luajit -v | cut -d' ' -f1-2)}; file $(du -m "$csv" | cut -f1) MB" >&2
slm() { LUA_PATH="$lpath" LUA_CPATH="$build/?.so;;" lua5.4 "$here/bench.lua" "$csv" "slm $1" >> "$results"; }
peer() { (cd "$here" && node bench.mjs "$csv" "csv-parse $1") >> "$results"; }
slmjit() {
  [ -z "$jit" ] || LUA_PATH="$lpath" LUA_CPATH="$jitbuild/?.so;;" luajit "$here/bench.lua" "$csv" "slm-jit $1" >> "$results"
}
# odd rounds: Lua 5.4, node, LuaJIT; even rounds: LuaJIT, node, Lua 5.4
for r in $(seq "$rounds"); do
  echo "round $r..." >&2
  if [ $((r % 2)) = 1 ]; then slm "$r"; peer "$r"; slmjit "$r"; else slmjit "$r"; peer "$r"; slm "$r"; fi
done
LUA_PATH="$lpath" lua5.4 "$here/report.lua" "$results"
