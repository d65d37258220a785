#!/bin/sh
# tests/fuzz/run.sh - build and run every libFuzzer harness tests/fuzz/fuzz_*.c
#
#   FUZZ_SECONDS=60 sh tests/fuzz/run.sh            # all harnesses
#   FUZZ_SECONDS=10 sh tests/fuzz/run.sh sse bpe    # only these
#
# Each harness is linked with every csrc/*.c except core.c (the Lua module
# entry point), under ASan + UBSan + libFuzzer, and runs for FUZZ_SECONDS
# (default 60).  Its seed corpus is tests/fuzz/corpus/<name>/ when present
# (<name> is the file name without "fuzz_" and ".c"); new inputs go to a
# scratch corpus under FUZZ_OUT, never into the tree.  Crash, leak and
# timeout reproducers are written to FUZZ_OUT.  Exits non-zero when any
# harness fails to build or finds anything.
#
# Environment: FUZZ_SECONDS, FUZZ_OUT (default ${TMPDIR:-/tmp}/slm-fuzz),
# CC (default clang), LUA_INC (default /usr/include/lua5.4), FUZZ_FLAGS
# (extra libFuzzer flags, e.g. "-jobs=2").
set -u

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
secs=${FUZZ_SECONDS:-60}
out=${FUZZ_OUT:-${TMPDIR:-/tmp}/slm-fuzz}
cc=${CC:-clang}
lua_inc=${LUA_INC:-/usr/include/lua5.4}
extra=${FUZZ_FLAGS:-}

mkdir -p "$out" || exit 1

srcs=""
for f in "$root"/csrc/*.c; do
  [ "$(basename "$f")" = core.c ] || srcs="$srcs $f"
done

harnesses=""
if [ $# -gt 0 ]; then
  for name in "$@"; do harnesses="$harnesses $here/fuzz_$name.c"; done
else
  for f in "$here"/fuzz_*.c; do [ -e "$f" ] && harnesses="$harnesses $f"; done
fi
if [ -z "$harnesses" ]; then
  echo "fuzz: no harness found in $here" >&2
  exit 1
fi

status=0
for h in $harnesses; do
  name=$(basename "$h" .c)
  name=${name#fuzz_}
  bin="$out/fuzz_$name"
  echo "== fuzz_$name: building"
  # shellcheck disable=SC2086 # $srcs is a list of paths without spaces
  if ! "$cc" -g -O1 -fno-omit-frame-pointer \
      -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
      -I"$root/csrc" -I"$lua_inc" "$h" $srcs \
      -llua5.4 -lcurl -lm -o "$bin"; then
    echo "fuzz_$name: build failed" >&2
    status=1
    continue
  fi
  work="$out/corpus-$name"
  mkdir -p "$work"
  seeds=""
  [ -d "$here/corpus/$name" ] && seeds="$here/corpus/$name"
  echo "== fuzz_$name: running ${secs}s"
  # shellcheck disable=SC2086
  ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1} \
  UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1} \
    "$bin" -max_total_time="$secs" -timeout=25 -rss_limit_mb=2048 \
      -print_final_stats=1 -artifact_prefix="$out/$name-" $extra \
      "$work" $seeds
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "fuzz_$name: FAILED (exit $rc); reproducers: $out/$name-*" >&2
    status=1
  else
    echo "fuzz_$name: ok"
  fi
done
exit $status
