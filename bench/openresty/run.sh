#!/usr/bin/env bash
# bench/openresty/run.sh: lua-slm in nginx against plain proxy_pass, one run
# (README.md).  Needs wrk, Debian's nginx + libnginx-mod-http-lua, and the
# LuaJIT core in build-jit/ (built here when missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v wrk >/dev/null || { echo "bench/openresty: wrk is not installed (bin/setup-deps --bench)" >&2; exit 1; }
[ -f build-jit/slm/core.so ] || bin/build build-jit -DSLM_LUA=luajit >/dev/null
[ -f build/slm/core.so ] || bin/build build >/dev/null
LUA_PATH="$PWD/lua/?.lua;$PWD/lua/?/init.lua;$PWD/?.lua;;" LUA_CPATH="$PWD/build/?.so;;" exec lua5.4 bench/openresty/bench.lua
