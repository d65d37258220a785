#!/bin/bash
# bench/batch/job/run.sh - a 20,000-row classify job against the simulator
# at concurrency 64: `slm classify` (lua-slm, Lua 5.4) against the same job
# written with the official openai npm SDK plus csv-parse (bench.mjs, the
# versions package-lock.json pins), same request bodies, same concurrency;
# then the resume overhead: `slm classify` rerun on its finished output.
#
#   bench/batch/job/run.sh                         # 3 rounds, 20,000 rows, concurrency 64
#   SLM_BENCH_ROUNDS=5 SLM_BENCH_ROWS=50000 SLM_BENCH_CONC=64 bench/batch/job/run.sh
#
# Each round runs both jobs one right after the other (the order reversed
# every other round) against one simulator (nginx, 4 workers, 127.0.0.1);
# wall time and CPU time (user + system of the job's process, from
# /usr/bin/time) per job, the medians, and the ratios lua-slm / node.
# Goals: CPU per row <= 0.5x, wall time no worse, resume < 2% of the CPU.
# Not a test: nothing here gates CI.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
rounds=${SLM_BENCH_ROUNDS:-3}
rows=${SLM_BENCH_ROWS:-20000}
conc=${SLM_BENCH_CONC:-64}
export LUA_PATH="$root/lua/?.lua;$root/lua/?/init.lua;$root/?.lua;;"

"$root/bin/setup-deps" --bench >/dev/null
"$root/bin/build" "$root/build" >/dev/null
if [ ! -f "$here/node_modules/openai/package.json" ] || [ ! -f "$here/node_modules/csv-parse/package.json" ]; then
  (cd "$here" && npm ci --no-audit --no-fund >/dev/null)
fi

work=$(mktemp -d)
sim=$(lua5.4 -e 'local up = require("tests.upstream.launch").start{ workers = 4, quiet = true }
  print(up.url) print(up.prefix)')
url=$(echo "$sim" | sed -n 1p)
prefix=$(echo "$sim" | sed -n 2p)
trap 'lua5.4 "$root/tests/upstream/launch.lua" stop "$prefix" >/dev/null; rm -rf "$work"' EXIT
lua5.4 "$here/gen.lua" "$rows" "$work/in.csv"
export SLM_BASE_URL="$url" SLM_API_KEY=sk-bench OPENAI_BASE_URL="$url" OPENAI_API_KEY=sk-bench

# one timed run: "wall cpu" on stdout
timed() {
  /usr/bin/time -f "%e %U %S" -o "$work/time" "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
  awk '{ printf "%.3f %.3f\n", $1, $2 + $3 }' "$work/time"
}
slm_job() {
  rm -f "$work/slm.csv" "$work/slm.csv.ledger" "$work/slm.csv.usage.jsonl"
  timed "$root/bin/slm" classify --labels billing,delivery,other -c "$conc" --no-progress -o "$work/slm.csv" "$work/in.csv"
}
node_job() { timed node "$here/bench.mjs" "$work/in.csv" "$work/node.csv" "$conc"; }

echo "classify job: $rows rows, concurrency $conc, $rounds rounds"
printf '%-7s %-10s %9s %9s %12s\n' round job wall_s cpu_s cpu_ms/row
: >"$work/results"
for r in $(seq 1 "$rounds"); do
  if [ $((r % 2)) = 1 ]; then order="slm node"; else order="node slm"; fi
  for j in $order; do
    read -r wall cpu < <(${j}_job)
    echo "$j $wall $cpu" >>"$work/results"
    printf '%-7s %-10s %9.2f %9.2f %12.4f\n' "$r" "$j" "$wall" "$cpu" "$(echo "$cpu * 1000 / $rows" | bc -l)"
  done
done
# the resume: the last slm job's output is complete; rerun it
read -r rwall rcpu < <(timed "$root/bin/slm" classify --labels billing,delivery,other -c "$conc" --no-progress \
  -o "$work/slm.csv" "$work/in.csv")
lua5.4 - "$work/results" "$rwall" "$rcpu" "$rows" "$work/slm.csv" "$work/node.csv" <<'LUA'
local path, rwall, rcpu, rows, slm_out, node_out = arg[1], tonumber(arg[2]), tonumber(arg[3]), tonumber(arg[4]), arg[5], arg[6]
local t = { slm = { wall = {}, cpu = {} }, node = { wall = {}, cpu = {} } }
for line in io.lines(path) do
  local j, w, c = line:match("(%S+) (%S+) (%S+)")
  table.insert(t[j].wall, tonumber(w)); table.insert(t[j].cpu, tonumber(c))
end
local function median(l) table.sort(l) return l[(#l + 1) // 2] end
local sw, sc, nw, nc = median(t.slm.wall), median(t.slm.cpu), median(t.node.wall), median(t.node.cpu)
local function count_lines(p) local n = 0 for _ in io.lines(p) do n = n + 1 end return n end
print(("median    slm  wall %.2f s  cpu %.2f s (%.4f ms/row)"):format(sw, sc, sc * 1000 / rows))
print(("median    node wall %.2f s  cpu %.2f s (%.4f ms/row)"):format(nw, nc, nc * 1000 / rows))
print(("ratio slm/node: cpu per row %.2fx (goal <= 0.5x), wall %.2fx (goal <= 1x)"):format(sc / nc, sw / nw))
print(("resume of the finished job: wall %.2f s, cpu %.2f s = %.1f%% of the job's cpu (goal < 2%%)"):format(rwall, rcpu,
  100 * rcpu / sc))
LUA
