#!/usr/bin/env bash
# bench/concurrency/run.sh: the foundation benchmark.  1,000 chat-completion
# requests against the local nginx simulator (20 ms server delay), side by
# side for:
#   1. lua-slm, slm.map with concurrency 50            (slm_bench.lua map)
#   a. lua-slm, the same requests one at a time         (slm_bench.lua seq)
#   b. Debian's lua-curl + lua-cjson under lua5.1       (luacurl_bench.lua)
#   c. the official openai SDK under node, 50 workers   (openai_bench.mjs)
# Each contender runs in its own process against the same simulator with the
# same request (prompt.json), warms up, then prints one RESULT line; this
# script prints the table.  See README.md.  Not a test: goals are reported,
# not asserted.  Exits 1 only when a contender fails or gets wrong replies.
#
#   bench/concurrency/run.sh
#   env: BENCH_N (1000)  BENCH_WARMUP (50)  BENCH_CONC (50)
#        REPEAT (1): run every contender that many times (rounds interleaved)
#                    and report the median of each figure
#        BUILD_DIR (build-bench: a build tree of its own, RelWithDebInfo,
#                   no sanitizers, warnings not fatal, so that nobody's
#                   flags or half-done build in build/ are what gets measured)
#        SKIP_SETUP=1 (no bin/setup-deps)
#        PIN (1 on a machine with 2 cores or more): the simulator runs on
#                    core 0 and every contender (and the calibration) on the
#                    other cores, as a provider runs on machines of its own;
#                    PIN=0: everything shares every core (README.md, "Cores")
#        SIM_WORKERS (1 with PIN=1, else nproc): nginx workers of the
#                    simulator; with PIN=0, 1 serialises the simulator's own
#                    work for all 50 requests in flight on one core (README.md,
#                    "Cores")
#        KEEP_AWAKE=1: during the runs, one SCHED_IDLE busy loop per core
#                    keeps the cores from idling (see README.md, "Idle
#                    cores"): the machine, not a contender, is what changes
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd -P)
root=$(cd "$here/../.." && pwd -P)
cd "$root"

N=${BENCH_N:-1000}
WARMUP=${BENCH_WARMUP:-50}
CONC=${BENCH_CONC:-50}
REPEAT=${REPEAT:-1}
BUILD_DIR=${BUILD_DIR:-build-bench}
DELAY_MS=20   # the "delay=20" scenario of prompt.json
export BENCH_N=$N BENCH_WARMUP=$WARMUP BENCH_CONC=$CONC

say() { echo "run.sh: $*" >&2; }

# --- dependencies -------------------------------------------------------------
if [ "${SKIP_SETUP:-}" != 1 ]; then
  bin/setup-deps --bench || { say "bin/setup-deps --bench failed"; exit 2; }
fi

have_luacurl=1
if ! command -v lua5.1 >/dev/null || ! lua5.1 -e 'require "curl"; require "cjson"' 2>/dev/null; then
  say "lua5.1 with lua-curl and lua-cjson is missing: skipping contender (b)"
  have_luacurl=0
fi
have_node=1
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  say "node/npm missing: skipping contender (c)"
  have_node=0
elif [ ! -d "$here/node_modules/openai" ]; then
  say "npm install (bench/concurrency)"
  if ! (cd "$here" && npm install --no-audit --no-fund >&2); then
    say "npm install failed: skipping contender (c)"
    have_node=0
  fi
fi

say "building slm.core ($BUILD_DIR)"
bin/build "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSLM_SANITIZE=OFF -DSLM_WERROR=OFF \
  || { say "build failed"; exit 2; }

# --- cores (PIN) --------------------------------------------------------------
# The simulator stands in for a provider, whose CPU is not the client's: with
# PIN=1 it gets core 0 (nginx inherits the launcher's affinity) and the
# contenders get the others, so no contender's figures include the
# simulator's work on its core or waits for it.
NCPU=$(nproc)
PIN=${PIN:-1}
if [ "$PIN" = 1 ] && { [ "$NCPU" -lt 2 ] || ! command -v taskset >/dev/null; }; then
  say "PIN: needs 2 cores and taskset: everything shares every core"
  PIN=0
fi
SIM_ON=(); CLIENT_ON=()
if [ "$PIN" = 1 ]; then
  SIM_ON=(taskset -c 0); CLIENT_ON=(taskset -c "1-$((NCPU - 1))")
  cores="simulator on core 0, contenders and calibration on cores 1-$((NCPU - 1)) (PIN=1)"
  SIM_WORKERS=${SIM_WORKERS:-1}
else
  cores="shared by the simulator and the contenders (PIN=0)"
  SIM_WORKERS=${SIM_WORKERS:-$NCPU}
fi

# --- the simulator ------------------------------------------------------------
sim=$(${SIM_ON[@]+"${SIM_ON[@]}"} lua5.4 tests/upstream/launch.lua start --workers "$SIM_WORKERS" 2>/dev/null) || { say "simulator did not start"; exit 2; }
URL=$(echo "$sim" | sed -n 1p)
PREFIX=$(echo "$sim" | sed -n 2p)
BASE=${URL%/v1}
stop_sim() { [ -n "${PREFIX:-}" ] && lua5.4 tests/upstream/launch.lua stop "$PREFIX" || true; PREFIX=; }
child=
trap stop_sim EXIT
trap '[ -n "$child" ] && kill "$child" 2>/dev/null; stop_spinners; stop_sim; exit 130' INT TERM
say "simulator at $URL ($SIM_WORKERS nginx workers)"

sim_reset() { curl -s -m 5 -X POST "$BASE/__sim/reset" >/dev/null; }
sim_requests() { curl -s -m 5 "$BASE/__sim/stats" | grep -o '"requests":[0-9]*' | grep -o '[0-9]*$' || echo 0; }

# Other work on this machine skews every figure here (2 cores): note the load.
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
cpu_snap() { awk '{ sub(/.*\) /, ""); print FILENAME, $12 + $13 }' /proc/[0-9]*/stat 2>/dev/null || true; }
busy_now() {  # processes that used >= 20% of a core over the last second
  local a b; a=$(cpu_snap); sleep 1; b=$(cpu_snap)
  awk -v hz="$(getconf CLK_TCK)" 'NR == FNR { t[$1] = $2; next }
    ($1 in t) && ($2 - t[$1]) / hz >= 0.2 {
      f = $1; sub(/\/stat$/, "/comm", f); getline name < f; close(f)
      printf "%s%s %d%%", sep, name, ($2 - t[$1]) / hz * 100; sep = ", " }' <(echo "$a") <(echo "$b")
}
busy=$(busy_now | head -c 300)
[ -n "$busy" ] && say "warning: other processes are using CPU: $busy"

# --- idle cores (KEEP_AWAKE=1) --------------------------------------------------
# SCHED_IDLE threads run only when nothing else wants the core, so they take
# no CPU from the contenders or the simulator; they only stop a core from
# halting between two events (in this VM, waking a halted core costs tens of
# microseconds per event).  Started after the load check above.
spinners=()
kept_awake=0
stop_spinners() { [ ${#spinners[@]} -gt 0 ] && kill "${spinners[@]}" 2>/dev/null; spinners=(); }
awake="no (cores idle normally)"
if [ "${KEEP_AWAKE:-}" = 1 ]; then
  if command -v chrt >/dev/null; then
    for _ in $(seq "$(nproc)"); do chrt -i 0 sh -c 'while :; do :; done' & spinners+=($!); done
    kept_awake=1
    awake="yes: $(nproc) SCHED_IDLE busy loops keep the cores from idling"
    say "KEEP_AWAKE: ${#spinners[@]} SCHED_IDLE busy loops started"
  else
    say "KEEP_AWAKE: chrt is missing: cores idle normally"
  fi
fi

# --- contenders -----------------------------------------------------------------
results=$(mktemp /tmp/slm-bench-conc.XXXXXX)
logs=$(mktemp -d /tmp/slm-bench-conc-logs.XXXXXX)
keep_logs=0
trap 'stop_spinners; stop_sim; rm -f "$results"; [ $keep_logs = 1 ] || rm -rf "$logs"' EXIT
failed=0

# run_one KEY LABEL command...
run_one() {
  local key=$1 label=$2; shift 2
  local out="$logs/$key.$round.out" err="$logs/$key.$round.err" line got
  sim_reset
  say "round $round/$REPEAT: $label"
  # in the background + wait, so that a signal to this script acts at once
  ${CLIENT_ON[@]+"${CLIENT_ON[@]}"} "$@" >"$out" 2>"$err" &
  child=$!
  if ! wait "$child"; then
    say "$label exited with an error:"; tail -n 5 "$err" >&2; failed=1
  fi
  child=
  line=$(grep '^RESULT ' "$out" | tail -n 1 || true)
  if [ -z "$line" ]; then
    say "$label printed no RESULT line"; failed=1; return
  fi
  [ -s "$err" ] && sed 's/^/    /' "$err" >&2
  got=$(sim_requests)
  echo "$line key=$key label=$label server_requests=$got round=$round" >>"$results"
}

SLM_ENV=(env LUA_PATH="lua/?.lua;lua/?/init.lua;./?.lua;;" LUA_CPATH="$BUILD_DIR/?.so;;")

# Calibration: the simulator's own latency at this concurrency, seen by a
# client with no Lua at all (the curl CLI: libcurl multi, --parallel), run
# in every round right after lua-slm so that both see the same machine load.
# Appends "CALIB n=<reused-connection requests> mean_ms=<their mean latency> round=<r>".
have_calib=0
if curl --help all 2>/dev/null | grep -q -- '--parallel-max'; then
  have_calib=1
  cfg="$logs/curl.cfg"; body="$logs/body.json"
  PROMPT="$here/prompt.json" "${SLM_ENV[@]}" lua5.4 -e '
    local json = require "slm.json"
    local f = assert(io.open(os.getenv("PROMPT"))); local P = json.decode(f:read("a")); f:close()
    io.write(json.encode{ model = P.model, max_tokens = P.max_tokens, messages = {
      { role = "system", content = P.system }, { role = "user", content = (P.user:gsub("{i}", "1")) } } })
  ' >"$body"
  : >"$cfg"
  for _ in $(seq $((N + WARMUP))); do printf 'url = "%s/chat/completions"\noutput = /dev/null\n' "$URL" >>"$cfg"; done
fi
calibrate() {
  [ $have_calib = 1 ] || return 0
  sim_reset
  say "round $round/$REPEAT: calibration (curl CLI)"
  ${CLIENT_ON[@]+"${CLIENT_ON[@]}"} curl -s -Z --parallel-max "$CONC" -H 'Content-Type: application/json' -H "X-Sim-Scenario: delay=$DELAY_MS" \
      --data-binary @"$body" -w '%{time_total} %{num_connects} %{http_code}\n' -K "$cfg" 2>/dev/null \
    | awk -v r="$round" '$2 == 0 && $3 == 200 { n++; s += $1 } END { if (n) printf "CALIB n=%d mean_ms=%.3f round=%d\n", n, s / n * 1000, r }' \
    >>"$results" || true
}

for round in $(seq "$REPEAT"); do
  run_one slm "lua-slm_slm.map_c=$CONC" "${SLM_ENV[@]}" lua5.4 "$here/slm_bench.lua" map "$URL"
  calibrate
  run_one slmseq "(a)_lua-slm_sequential" "${SLM_ENV[@]}" lua5.4 "$here/slm_bench.lua" seq "$URL"
  if [ $have_luacurl = 1 ]; then
    run_one luacurl "(b)_lua-curl+cjson_lua5.1_seq" lua5.1 "$here/luacurl_bench.lua" "$URL"
  fi
  if [ $have_node = 1 ]; then
    run_one node "(c)_openai-node_c=$CONC" node "$here/openai_bench.mjs" "$URL"
  fi
done
stop_spinners

# --- the table --------------------------------------------------------------------
machine="$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'), $(free -g | awk '/^Mem:/ {print $2}') GiB"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "?")
dirty=$(git status --porcelain 2>/dev/null | grep -c . || true)
vers="lua5.4 $(lua5.4 -v 2>&1 | awk '{print $2}'), libcurl $("${SLM_ENV[@]}" lua5.4 -e 'io.write(require("slm.core").curl_version)')"
[ $have_luacurl = 1 ] && vers="$vers, lua5.1 $(lua5.1 -v 2>&1 | awk '{print $2}') + lua-curl $(lua5.1 -e 'io.write(require("curl")._VERSION)')"
[ $have_node = 1 ] && vers="$vers, node $(node --version), openai $(node -p 'require("./bench/concurrency/node_modules/openai/package.json").version')"

echo
echo "bench/concurrency: $N requests (after $WARMUP warm-up), server delay ${DELAY_MS} ms, $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine: $machine"
echo "tree: $commit (+$dirty uncommitted paths); $vers"
echo "load average (1/5/15 min) at start: $load_start, at end: $(cut -d' ' -f1-3 /proc/loadavg)${busy:+; busy at start: $busy}"
echo "simulator: nginx with $SIM_WORKERS worker process(es) (SIM_WORKERS); cores: $cores"
echo "cores kept awake (KEEP_AWAKE): $awake"
[ "$REPEAT" -gt 1 ] && echo "each figure: median of $REPEAT runs"
awk -v N="$N" -v CONC="$CONC" -v DELAY="$DELAY_MS" -v REPEAT="$REPEAT" -v AWAKE="$kept_awake" '
function kv(line, k,   m) { if (match(line, " " k "=[^ ]*")) return substr(line, RSTART + length(k) + 2, RLENGTH - length(k) - 2); return "" }
function median(list, n,   i, j, t, a) {
  split(list, a, " "); n = 0; for (i in a) if (a[i] != "") n++
  for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
  return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
/^CALIB / { cal_n = cal_n " " kv($0, "n"); cal_ms = cal_ms " " kv($0, "mean_ms"); cal_r[kv($0, "round")] = kv($0, "mean_ms"); next }
{
  k = kv($0, "key")
  if (!(k in label)) { order[++nk] = k; label[k] = kv($0, "label"); gsub("_", " ", label[k]) }
  conc[k] = kv($0, "conc"); n[k] = kv($0, "n")
  if (k == "slm") slm_r[kv($0, "round")] = kv($0, "seconds")
  secs[k] = secs[k] " " kv($0, "seconds"); cpu[k] = cpu[k] " " kv($0, "cpu"); rss[k] = rss[k] " " kv($0, "rss_kb")
  if (kv($0, "mean_ms") != "") lat[k] = lat[k] " " kv($0, "mean_ms")
  okc[k] = okc[k] " " kv($0, "ok"); err[k] = err[k] " " kv($0, "errors"); srv[k] = srv[k] " " kv($0, "server_requests")
}
END {
  ideal = N * DELAY / 1000 / CONC
  printf "ideal time at concurrency %d: %d x %d ms / %d = %.3f s (%.0f req/s)\n\n", CONC, N, DELAY, CONC, ideal, N / ideal
  hdr = sprintf("%-34s %5s %8s %8s %9s %9s %11s %8s %7s %7s %9s", "contender", "conc", "seconds", "req/s", "%ideal", "%own-ideal", "CPU s/1k", "RSS MB", "ok", "errors", "server")
  print hdr; gsub(/./, "-", hdr); print hdr
  for (i = 1; i <= nk; i++) {
    k = order[i]
    s = median(secs[k]); c = median(cpu[k]); r = median(rss[k]); o = median(okc[k]); e = median(err[k]); sv = median(srv[k])
    own = n[k] * DELAY / 1000 / conc[k]
    cpk[k] = c / n[k] * 1000
    printf "%-34s %5d %8.3f %8.0f %8.1f%% %8.1f%% %11.3f %8.1f %7d %7d %9d\n", label[k], conc[k], s, n[k] / s, ideal / s * 100, own / s * 100, cpk[k], r / 1024, o, e, sv
    tput[k] = ideal / s * 100
    secs_m[k] = s
  }
  if (REPEAT > 1) {
    print ""
    for (i = 1; i <= nk; i++) { k = order[i]; printf "rounds, %s: seconds%s, CPU s%s\n", label[k], secs[k], cpu[k] }
  }
  print ""
  print "%ideal: ideal time at concurrency " CONC " / seconds.  %own-ideal: N x delay / the contender'"'"'s own concurrency / seconds."
  print "CPU s/1k: user+sys CPU seconds of the client process per 1,000 requests (timed requests only)."
  print "RSS MB: peak RSS (VmHWM) of the client process.  server: requests the simulator counted (warm-up included)."
  if (cal_ms != "") {
    cm = median(cal_ms); att = N / CONC * cm / 1000
    printf "calibration: the curl CLI (libcurl multi, no Lua), %d parallel, same simulator: mean latency %.2f ms\n", CONC, cm
    printf "             on reused connections (%s requests; rounds:%s ms)\n", median(cal_n), cal_ms
    printf "             -> about %.3f s for %d requests (%.1f%% of ideal) is what this simulator and machine allow\n", att, N, ideal / att * 100
    if ("slm" in lat) printf "             lua-slm (c=%d): mean %.2f ms per client:chat call (rounds:%s ms), %.2f ms more than the curl CLI\n", CONC, median(lat["slm"]), lat["slm"], median(lat["slm"]) - cm
  }
  print ""
  if ("slm" in cpk) {
    if ("luacurl" in cpk) printf "CPU per request, lua-slm (c=%d) / (b) lua-curl (seq): %.2fx\n", CONC, cpk["slm"] / cpk["luacurl"]
    if ("node" in cpk) printf "CPU per request, lua-slm (c=%d) / (c) openai-node (c=%d): %.2fx\n", CONC, CONC, cpk["slm"] / cpk["node"]
    if (("slmseq" in cpk) && ("luacurl" in cpk)) printf "CPU per request at concurrency 1, (a) lua-slm seq / (b) lua-curl seq: %.2fx\n", cpk["slmseq"] / cpk["luacurl"]
    if ("slmseq" in cpk) printf "concurrency gain, lua-slm c=%d vs sequential: %.1fx the throughput\n", CONC, median(secs["slmseq"]) / median(secs["slm"])
    print ""
    # the goals of the second edition of the client; %ideal is a diagnostic of
    # this VM (its idle cores), no longer a goal
    if ("luacurl" in cpk) {
      r1 = cpk["slm"] / cpk["luacurl"]
      printf "goal 1, CPU/request at concurrency %d <= 0.6x (b) lua-curl: %.2fx (%.3f vs %.3f s/1k) -> %s\n", CONC, r1, cpk["slm"], cpk["luacurl"], (r1 <= 0.6 ? "MET" : "MISSED")
    }
    if (("slmseq" in cpk) && ("luacurl" in cpk)) {
      r2 = cpk["slmseq"] / cpk["luacurl"]
      printf "goal 2, CPU/request one at a time <= 1.0x (b) lua-curl: %.2fx (%.3f vs %.3f s/1k) -> %s\n", r2, cpk["slmseq"], cpk["luacurl"], (r2 <= 1.0 ? "MET" : "MISSED")
    }
    best = ""; bestv = 0
    for (i = 1; i <= nk; i++) { k = order[i]; if (k != "slm" && k != "slmseq" && (best == "" || secs_m[k] < bestv)) { best = label[k]; bestv = secs_m[k] } }
    if (best != "") printf "goal 3, throughput >= that of the best peer, %s: %.0f vs %.0f req/s -> %s\n", best, N / secs_m["slm"], N / bestv, (secs_m["slm"] <= bestv ? "MET" : "MISSED")
    # The %ideal of each round, and (a diagnostic) the rounds in which the curl
    # CLI, run right after lua-slm, waited at most 5% longer than the
    # nominal delay.  In the slow phases of the host every contender loses,
    # but a slow CPU costs lua-slm more than the calibration (README.md,
    # "Latest numbers").
    printf "diagnostic, lua-slm throughput: %.2f%% of ideal\n", tput["slm"]
    line = ""; q = ""; nq = 0
    for (r = 1; r <= REPEAT; r++) if (r in slm_r) {
      p = ideal / slm_r[r] * 100; line = line sprintf(" %.1f%%", p)
      if ((r in cal_r) && cal_r[r] <= DELAY * 1.05) { q = q " " p; nq++ }
    }
    if (REPEAT > 1) printf "        (rounds:%s)\n", line
    if (cal_ms != "") printf "        (lua-slm reaches %.1f%% of the calibrated attainable throughput)\n", att / median(secs["slm"]) * 100
    if (cal_ms != "" && REPEAT > 1) {
      if (nq) printf "        (rounds whose calibration was within 5%% of the delay, <= %.1f ms: %d of %d, lua-slm median %.2f%%)\n", DELAY * 1.05, nq, REPEAT, median(q)
      else printf "        (rounds whose calibration was within 5%% of the delay, <= %.1f ms: none of %d)\n", DELAY * 1.05, REPEAT
    }
    if (AWAKE == 0) printf "        (cores idled between events: on a VM that costs every contender; KEEP_AWAKE=1, README.md \"Idle cores\")\n"
  }
}' "$results"

odd=$(awk -v want=$((N + WARMUP)) '/^RESULT / { for (i = 1; i <= NF; i++) if ($i ~ /^server_requests=/ && $i != "server_requests=" want) print }' "$results")
[ -n "$odd" ] && say "warning: the simulator did not count $((N + WARMUP)) requests for every run (retries?):" && echo "$odd" >&2
bad=$(awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^errors=/ && $i != "errors=0") print }' "$results")
if [ -n "$bad" ] || [ $failed = 1 ]; then
  keep_logs=1
  say "some contender failed or got wrong replies (logs in $logs)"
  exit 1
fi
