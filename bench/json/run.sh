#!/bin/sh
# bench/json/run.sh - slm.json.encode (our C encoder) against lua-cjson's
# encode on chat request bodies, side by side in one process per engine:
# Lua 5.4 (build/), then LuaJIT (build-jit/).
#
#   bench/json/run.sh
#   BENCH_ROUNDS=7 BENCH_SECONDS=0.15 bench/json/run.sh
#
# Prints CPU microseconds per call for both and the ratio (cjson / ours).
# Not a test: nothing here gates CI.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
lpath="$root/lua/?.lua;$root/lua/?/init.lua;;"

"$root/bin/build" "$root/build"
LUA_PATH="$lpath" LUA_CPATH="$root/build/?.so;;" lua5.4 "$here/bench.lua"
if command -v luajit >/dev/null; then
  echo
  "$root/bin/build" "$root/build-jit" -DSLM_LUA=luajit
  LUA_PATH="$lpath" LUA_CPATH="$root/build-jit/?.so;;" luajit "$here/bench.lua"
fi
