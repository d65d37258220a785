#!/bin/sh
# bench/tokenizer/run.sh - slm.tokenizer vs gpt-tokenizer, js-tiktoken and
# @dqbd/tiktoken (WASM) under node: the same texts, the same machine, one run.
#
#   bench/tokenizer/run.sh            # builds slm.core into build/ if needed
#   SLM_BENCH_ONLY=h2h SLM_BENCH_ROUNDS=5 bench/tokenizer/run.sh   # head to head only
#   SLM_BUILD=/tmp/b SLM_BUILD_JIT=/tmp/b-jit bench/tokenizer/run.sh
#
# lua-slm's three operations - tok:count(s), tok:encode(s, {packed = true})
# (an slm.IdList) and tok:encode(s) (a Lua table) - against gpt-tokenizer's
# countTokens and encode on ~10 MB of English and ~2 MB of
# Russian/code/numbers generated from the tokenizer fixture corpus: MB/s
# (CPU time, best of 3) and ratios against gpt-tokenizer; times for
# pathological inputs; then head-to-head rounds on the English text, where
# lua-slm and gpt-tokenizer alternate process by process (README.md here
# says how to read them).  Each peer run is capped at SLM_BENCH_TIMEOUT
# seconds (default 30; the JavaScript tokenizers are quadratic on some
# pathological inputs), so a full run takes about 10 minutes;
# SLM_BENCH_ONLY=h2h runs only the head-to-head rounds (about 1 minute for
# 3 rounds).  Not a test: nothing here gates CI.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${SLM_BUILD:-$root/build}
jitbuild=${SLM_BUILD_JIT:-}
data=${SLM_BENCH_DATA:-$build/bench-tokenizer}
timeout_s=${SLM_BENCH_TIMEOUT:-30}
only=${SLM_BENCH_ONLY:-}

"$root/bin/setup-deps" --bench

if [ ! -f "$build/slm/core.so" ]; then
  cmake -S "$root" -B "$build" >/dev/null
fi
cmake --build "$build" >/dev/null
if [ -n "$jitbuild" ]; then
  [ -f "$jitbuild/slm/core.so" ] || cmake -S "$root" -B "$jitbuild" -DSLM_LUA=luajit >/dev/null
  cmake --build "$jitbuild" >/dev/null
fi
if [ ! -d "$here/node_modules/gpt-tokenizer" ]; then
  (cd "$here" && npm install --no-audit --no-fund >/dev/null)
fi

lua5.4 "$here/gen_text.lua" "$root/tests/fixtures/tokens/corpus.txt" "$data"
results="$data/results.jsonl"
: > "$results"

echo "machine: $(nproc) cores, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1); node $(node --version); $(lua5.4 -v 2>&1 | cut -d' ' -f1-2)" >&2
if [ "$only" != h2h ]; then
  echo "running slm (Lua 5.4)..." >&2
  LUA_PATH="$root/lua/?.lua;;" LUA_CPATH="$build/?.so;;" lua5.4 "$here/bench.lua" "$data" "slm (Lua 5.4)" >> "$results"
  if [ -n "$jitbuild" ]; then
    echo "running slm (LuaJIT)..." >&2
    LUA_PATH="$root/lua/?.lua;;" LUA_CPATH="$jitbuild/?.so;;" luajit "$here/bench.lua" "$data" "slm (LuaJIT)" >> "$results"
  fi

  for lib in gpt-tokenizer js-tiktoken @dqbd/tiktoken; do
    for enc in o200k_base cl100k_base; do
      echo "running $lib $enc..." >&2
      for file in english.txt mixed.txt a200k.txt spaces200k.txt letters100k.txt; do
        reps=1 ops=encode
        case $file in english.txt|mixed.txt) reps=3 ;; esac
        [ "$lib" = gpt-tokenizer ] && [ "$reps" = 3 ] && ops=encode,count
        if ! (cd "$here" && timeout "$timeout_s" node --expose-gc bench.mjs "$data" "$lib" "$enc" "$file" "$reps" "$ops") >> "$results"; then
          printf '{"lib":"%s","enc":"%s","case":"%s","op":"encode","timeout":%s}\n' "$lib" "$enc" "$file" "$timeout_s" >> "$results"
        fi
      done
    done
  done
fi

# Head to head: lua-slm (Lua 5.4: count, packed encode, table encode) and
# gpt-tokenizer (countTokens, encode) on the English text, alternating
# process by process, so that a change in the machine's speed during the
# run (it varies by up to a third here) cannot land on one side of the
# ratios only.  report.lua prints each round's ratios and their spread.
rounds=${SLM_BENCH_ROUNDS:-3}
for enc in o200k_base cl100k_base; do
  for r in $(seq "$rounds"); do
    echo "head to head $enc, round $r..." >&2
    LUA_PATH="$root/lua/?.lua;;" LUA_CPATH="$build/?.so;;" lua5.4 "$here/bench.lua" "$data" "h2h slm $r" "$enc" english.txt >> "$results"
    (cd "$here" && timeout "$timeout_s" node --expose-gc bench.mjs "$data" gpt-tokenizer "$enc" english.txt 3 encode,count) \
      | sed "s/\"lib\":\"gpt-tokenizer\"/\"lib\":\"h2h gpt $r\"/" | grep '"op"' >> "$results" || true
  done
done
lua5.4 "$here/report.lua" "$results"
