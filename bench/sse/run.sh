#!/bin/sh
# bench/sse/run.sh - the streaming benchmark: the SSE parser's throughput
# (bench/sse/parser.lua), then the client CPU time to consume one
# 100,000-chunk stream from the simulator, side by side in one run:
#   lua-slm      client:chat{stream = true, on_delta = ...} and the iterator
#                `for text in client:stream{...}` (Lua 5.4)
#   lua-curl     lua-curl + cjson, SSE lines split in Lua (Lua 5.1)
#   openai-node  the official openai npm SDK's stream iterator (node)
#
#   bench/sse/run.sh
#   BENCH_N=100000 BENCH_RUNS=3 BENCH_WARMUP_N=10000 BENCH_WARMUP_RUNS=3 \
#     BENCH_BREAKDOWN=0 SLM_BUILD=/tmp/b bench/sse/run.sh
#
# One simulator (tests/upstream, nginx on 127.0.0.1) serves every contender;
# each contender runs in its own process: warm-up runs with a smaller N, then
# best of BENCH_RUNS timed runs (the run with the least CPU).  Every run is
# verified (all N content chunks, the exact text, finish_reason, usage), so a
# broken contender cannot look fast.  Then (unless BENCH_BREAKDOWN=0) where
# lua-slm's CPU per chunk goes (client_slm.lua breakdown).  Not a test:
# nothing here gates CI.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${SLM_BUILD:-$root/build}
timeout_s=${SLM_BENCH_TIMEOUT:-600}
export BENCH_N="${BENCH_N:-100000}" BENCH_RUNS="${BENCH_RUNS:-3}"
export BENCH_WARMUP_N="${BENCH_WARMUP_N:-10000}" BENCH_WARMUP_RUNS="${BENCH_WARMUP_RUNS:-3}"

# peers: lua5.1 + lua-curl, node + npm (does nothing when all are present)
"$root/bin/setup-deps" --bench || echo "run.sh: bin/setup-deps --bench failed; missing peers are skipped" >&2
"$root/bin/build" "$build"
if command -v npm >/dev/null && [ ! -d "$here/node_modules/openai" ]; then
  (cd "$here" && npm install --no-audit --no-fund --no-package-lock >/dev/null) ||
    echo "run.sh: npm install failed; the openai SDK contender is skipped" >&2
fi

lpath="$root/lua/?.lua;$root/lua/?/init.lua;$root/?.lua;;"
lcpath="$build/?.so;;"

work=$(mktemp -d "${TMPDIR:-/tmp}/slm-bench-sse.XXXXXX")
prefix=""
cleanup() {
  if [ -n "$prefix" ]; then lua5.4 "$root/tests/upstream/launch.lua" stop "$prefix" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

lua5.4 "$root/tests/upstream/launch.lua" start > "$work/sim" 2>"$work/sim.err" || {
  cat "$work/sim.err" >&2
  exit 1
}
url=$(sed -n 1p "$work/sim")
prefix=$(sed -n 2p "$work/sim")

cpu_model=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
echo "machine: $(nproc) cores, ${cpu_model:-unknown CPU}; $(lua5.4 -v 2>&1 | cut -d' ' -f1-2);" \
  "$(command -v lua5.1 >/dev/null && lua5.1 -v 2>&1 | cut -d' ' -f1-2 || echo 'no lua5.1');" \
  "node $(command -v node >/dev/null && node --version || echo none)"
echo "simulator: $url"
echo

echo "== SSE parser (bench/sse/parser.lua) =="
env LUA_PATH="$lpath" LUA_CPATH="$lcpath" lua5.4 "$here/parser.lua"
echo

echo "== clients: one stream of $BENCH_N chunks (model sim:chunks=$BENCH_N), best of $BENCH_RUNS after $BENCH_WARMUP_RUNS warm-ups of $BENCH_WARMUP_N =="
results="$work/results"
: > "$results"

# contender NAME COMMAND...: its RESULT line goes to $results
contender() {
  name=$1
  shift
  echo "running $name..." >&2
  if timeout --foreground "$timeout_s" "$@" > "$work/out" && grep -q '^RESULT .*ok=1' "$work/out"; then
    grep '^RESULT' "$work/out" | tail -1 >> "$results"
  else
    why=$(sed -n 's/^RESULT .*why=//p' "$work/out" | tail -1)
    echo "RESULT name=$name ok=0 why=${why:-\"exit status or timeout\"}" >> "$results"
  fi
}

contender lua-slm-chat env LUA_PATH="$lpath" LUA_CPATH="$lcpath" lua5.4 "$here/client_slm.lua" "$url" chat
contender lua-slm-iter env LUA_PATH="$lpath" LUA_CPATH="$lcpath" lua5.4 "$here/client_slm.lua" "$url" iter
if command -v lua5.1 >/dev/null && lua5.1 -e 'assert(pcall(require, "cURL") or pcall(require, "curl")); require "cjson"' 2>/dev/null; then
  contender lua-curl lua5.1 "$here/client_luacurl.lua" "$url"
else
  echo 'RESULT name=lua-curl ok=0 why="lua5.1 + lua-curl + lua-cjson not installed (bin/setup-deps --bench)"' >> "$results"
fi
if command -v node >/dev/null && [ -d "$here/node_modules/openai" ]; then
  contender openai-node node --expose-gc "$here/client_openai.mjs" "$url"
else
  echo 'RESULT name=openai-node ok=0 why="node or bench/sse/node_modules/openai missing"' >> "$results"
fi
echo

awk -v n="$BENCH_N" '
function field(line, k,    m) {
  if (match(line, " " k "=[^ ]*")) { m = substr(line, RSTART + length(k) + 2, RLENGTH - length(k) - 2); return m }
  return ""
}
{
  name[NR] = field($0, "name"); ok[NR] = field($0, "ok")
  chunks[NR] = field($0, "chunks"); wall[NR] = field($0, "wall"); cpu[NR] = field($0, "cpu")
  why[NR] = $0; sub(/^.* why=/, "", why[NR])
  if (ok[NR] == 1) per[NR] = cpu[NR] / chunks[NR] * 1e6
  if (name[NR] == "lua-slm-chat" && ok[NR] == 1) base = per[NR]
  if (name[NR] == "lua-curl" && ok[NR] == 1) curl = per[NR]
  if (name[NR] == "openai-node" && ok[NR] == 1) node = per[NR]
}
END {
  label["lua-slm-chat"] = "lua-slm chat{on_delta}"; label["lua-slm-iter"] = "lua-slm client:stream iterator"
  label["lua-curl"] = "lua-curl + cjson (Lua 5.1)"; label["openai-node"] = "openai SDK (node)"
  printf "| %-30s | %8s | %7s | %12s | %12s | %11s |\n", "contender", "chunks", "wall s", "client CPU s", "us CPU/chunk", "vs lua-slm"
  printf "|%s|%s|%s|%s|%s|%s|\n", "--------------------------------", "---------:", "--------:", "-------------:", "-------------:", "------------:"
  for (i = 1; i <= NR; i++) {
    l = (name[i] in label) ? label[name[i]] : name[i]
    if (ok[i] == 1)
      printf "| %-30s | %8d | %7.3f | %12.4f | %12.2f | %11s |\n", l, chunks[i], wall[i], cpu[i], per[i], base ? sprintf("%.2fx", per[i] / base) : "-"
    else
      printf "| %-30s | FAILED: %s\n", l, why[i]
  }
  print ""
  if (base && curl)
    printf "goal 1: lua-slm CPU/chunk <= 0.25x lua-curl (%.2f us): %.2f us, %.2fx of lua-curl -> %s\n", curl / 4, base, base / curl, (base <= curl / 4) ? "met" : "MISSED"
  if (base && node)
    printf "goal 2: lua-slm CPU/chunk < openai SDK (%.2f us): %.2f us, %.2fx of node -> %s\n", node, base, base / node, (base < node) ? "met" : "MISSED"
}' "$results"

if [ "${BENCH_BREAKDOWN:-1}" != 0 ]; then
  echo
  echo "== where lua-slm's CPU goes (bench/sse/client_slm.lua URL breakdown) =="
  env LUA_PATH="$lpath" LUA_CPATH="$lcpath" timeout --foreground "$timeout_s" lua5.4 "$here/client_slm.lua" "$url" breakdown ||
    echo "breakdown failed"
fi
