// bench/concurrency/openai_bench.mjs: peer (c) of the concurrency benchmark,
// the official `openai` SDK for node (run by run.sh; see README.md).
//
//   node bench/concurrency/openai_bench.mjs URL
//   env: BENCH_N (1000 timed requests), BENCH_WARMUP (50), BENCH_CONC (50)
//
// BENCH_CONC workers share the request indexes and each awaits
// client.chat.completions.create(...) in turn.  Prints the same RESULT line
// as slm_bench.lua; cpu is process.cpuUsage() (user+system of the whole
// process, every thread) over the timed requests.
import { readFileSync } from "node:fs";
import OpenAI from "openai";

const url = process.argv[2];
if (!url) {
  process.stderr.write("usage: node bench/concurrency/openai_bench.mjs URL\n");
  process.exit(2);
}
const N = Number(process.env.BENCH_N ?? 1000);
const WARMUP = Number(process.env.BENCH_WARMUP ?? 50);
const CONC = Number(process.env.BENCH_CONC ?? 50);

const P = JSON.parse(readFileSync(new URL("./prompt.json", import.meta.url), "utf8"));

const client = new OpenAI({
  baseURL: url,
  apiKey: "sk-bench",
  maxRetries: 0,
  defaultHeaders: { "X-Sim-Scenario": P.scenario },
});

let ok = 0;
let errors = 0;
let firstErr = null;

async function ask(i) {
  try {
    const res = await client.chat.completions.create({
      model: P.model,
      max_tokens: P.max_tokens,
      messages: [
        { role: "system", content: P.system },
        { role: "user", content: P.user.replace("{i}", String(i)) },
      ],
    });
    const text = res.choices?.[0]?.message?.content;
    const want = `Echo: Ticket #${i}:`;
    if (typeof text === "string" && text.startsWith(want)) {
      ok++;
    } else {
      errors++;
      firstErr ??= `unexpected reply: ${text}`;
    }
  } catch (e) {
    errors++;
    firstErr ??= String(e);
  }
}

async function batch(first, count) {
  let next = first;
  const end = first + count;
  const worker = async () => {
    while (next < end) {
      const i = next++;
      await ask(i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(CONC, count) }, worker));
}

function peakRssKb() {
  try {
    const m = readFileSync("/proc/self/status", "utf8").match(/VmHWM:\s*(\d+)/);
    return m ? Number(m[1]) : 0;
  } catch {
    return 0;
  }
}

await batch(1, WARMUP);
const werr = errors;
ok = 0;
errors = 0;

const t0 = process.hrtime.bigint();
const c0 = process.cpuUsage();
await batch(WARMUP + 1, N);
const cu = process.cpuUsage(c0);
const secs = Number(process.hrtime.bigint() - t0) / 1e9;
const cpu = (cu.user + cu.system) / 1e6;

if (firstErr) process.stderr.write(`openai_bench: first error: ${firstErr}\n`);
if (werr > 0) process.stderr.write(`openai_bench: warm-up had ${werr} errors\n`);
console.log(
  `RESULT name=openai-node mode=map n=${N} conc=${CONC} seconds=${secs.toFixed(4)} ` +
    `cpu=${cpu.toFixed(4)} rss_kb=${peakRssKb()} ok=${ok} errors=${errors}`,
);
