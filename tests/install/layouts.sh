#!/usr/bin/env bash
# tests/install/layouts.sh: the two ways to install lua-slm, each into a
# scratch directory (mktemp, removed at the end), each used from outside the
# checkout:
#   1. `cmake --install build` with DESTDIR: the files land where Debian's
#      lua5.4 searches under /usr/local by default (its own package.path and
#      package.cpath, moved under DESTDIR, find them), `slm` is in bin/ and
#      runs the simulator from its installed copy;
#   2. `luarocks --lua-version 5.4 make --deps-mode=none` (README's command,
#      lua-cjson from apt) into a tree of its own.
# Needs build/ (bin/build). Prints one line per check; exits 1 at the first failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
scratch=$(mktemp -d "${TMPDIR:-/tmp}/slm-inst.XXXXXX")
trap 'rm -rf "$scratch" "$root/build.luarocks"' EXIT
# EXPECT: where the modules must come from (not from another install)
smoke='local slm = require "slm"; assert(slm.client and slm.core.now())
for _, m in ipairs({ { "slm", package.path }, { "slm.core", package.cpath } }) do
  local p = package.searchpath(m[1], m[2])
  assert(p and p:find(os.getenv("EXPECT"), 1, true) == 1, m[1] .. " loaded from " .. tostring(p))
end
assert(slm.tokenizer("gpt-4o-mini"):count("hello world") == 2)
print("  require \"slm\" ok: " .. package.searchpath("slm", package.path) .. ", " .. package.searchpath("slm.core", package.cpath))'
ok() { echo "  ok: $*"; }
fail() { echo "  FAILED: $*"; exit 1; }

# The installed slm: models, then sim start, a chat against it, sim stop.
check_cli() {
  local slm=$1 url prefix out
  out=$(cd / && "$slm" models) || fail "$slm models"
  grep -q '^gpt-4o-mini ' <<<"$out" || fail "$slm models said: $out"
  url=$(cd / && "$slm" sim start 2>"$scratch/sim.err") || { cat "$scratch/sim.err"; fail "$slm sim start"; }
  prefix=$(sed -n 's/.* sim stop \(\/.*\)$/\1/p' "$scratch/sim.err")
  out=$(cd / && SLM_BASE_URL=$url "$slm" chat "installed" 2>/dev/null) || true
  (cd / && "$slm" sim stop "$prefix" 2>/dev/null) || fail "$slm sim stop $prefix"
  [ "$out" = "Echo: installed" ] || fail "$slm chat against $url said: $out"
  [ ! -e "$prefix" ] || fail "$prefix left behind"
  ok "$slm: models, sim start ($url), chat, sim stop"
}

# 1. cmake --install with DESTDIR, checked against lua5.4's own search paths
dest=$scratch/destdir
manifest_saved=""
if [ -f build/install_manifest.txt ]; then manifest_saved=$scratch/install_manifest.txt; cp build/install_manifest.txt "$manifest_saved"; fi
DESTDIR=$dest cmake --install build >/dev/null
if [ -n "$manifest_saved" ]; then cp "$manifest_saved" build/install_manifest.txt; else rm -f build/install_manifest.txt; fi
for f in usr/local/lib/lua/5.4/slm/core.so usr/local/share/lua/5.4/slm/init.lua usr/local/bin/slm \
         usr/local/share/lua-slm/sim/launch.lua usr/local/share/lua-slm/sim/nginx.conf.in; do
  [ -e "$dest/$f" ] || fail "cmake --install: no $f"
done
ok "cmake --install: /usr/local/{lib/lua/5.4,share/lua/5.4,bin,share/lua-slm/sim}"
# the /usr/local entries of lua5.4's default paths moved under DESTDIR, then
# the defaults (for lua-cjson)
paths=$(DEST=$dest lua5.4 -e 'local d = os.getenv("DEST")
  local function only(p) local t = {}
    for e in p:gmatch("[^;]+") do if e:find("^/usr/local/") then t[#t + 1] = d .. e end end
    return table.concat(t, ";") .. ";;" end
  print(only(package.path)); print(only(package.cpath))')
(cd / && EXPECT=$dest/usr/local/ LUA_PATH=$(echo "$paths" | sed -n 1p) LUA_CPATH=$(echo "$paths" | sed -n 2p) lua5.4 -e "$smoke") \
  || fail "require \"slm\" through lua5.4's default /usr/local paths"
check_cli "$dest/usr/local/bin/slm"

# 2. luarocks make, lua-cjson from apt
rocks=$scratch/rocks
rm -rf build.luarocks
if ! luarocks --lua-version 5.4 --tree "$rocks" make --deps-mode=none rockspec/lua-slm-*.rockspec >"$scratch/rocks.log" 2>&1; then
  tail -20 "$scratch/rocks.log"; rm -rf build.luarocks; fail "luarocks make"
fi
rm -rf build.luarocks
eval "$(luarocks --lua-version 5.4 --tree "$rocks" path)"
(cd / && EXPECT=$rocks/ lua5.4 -e "$smoke") || fail "require \"slm\" from the luarocks tree"
ok "luarocks --lua-version 5.4 make --deps-mode=none: tree $rocks"
check_cli "$rocks/bin/slm"
cd "$root"
