// bench/sse/client_openai.mjs: contender (3) of the streaming client
// benchmark, the official `openai` SDK for node and its stream iterator (run
// by run.sh; see README.md).
//
//   node --expose-gc bench/sse/client_openai.mjs URL
//   env: BENCH_N (100000 chunks), BENCH_RUNS (3 timed runs),
//        BENCH_WARMUP_N (10000), BENCH_WARMUP_RUNS (3)
//
// The user's code: `for await (const chunk of await
// client.chat.completions.create({..., stream: true}))`, pushing every
// non-empty choices[0].delta.content into an array joined at the end.  The
// request asks for stream_options.include_usage like lua-slm does, so every
// contender reads the same bytes.
//
// CPU is process.cpuUsage() (user+system of the whole process, all its
// threads) from just before the call until the verified text; wall is
// performance.now().  The warm-up runs let V8 optimise the hot paths first.
// Same output as client_slm.lua.
import OpenAI from "openai";
import { VERSION } from "openai/version";

const url = process.argv[2];
if (!url) {
  process.stderr.write("usage: node bench/sse/client_openai.mjs URL\n");
  process.exit(2);
}
const N = Number(process.env.BENCH_N ?? 100000);
const RUNS = Number(process.env.BENCH_RUNS ?? 3);
const WARMUP_N = Number(process.env.BENCH_WARMUP_N ?? 10000);
const WARMUP_RUNS = Number(process.env.BENCH_WARMUP_RUNS ?? 3);

const client = new OpenAI({ baseURL: url, apiKey: "sk-bench", maxRetries: 0, timeout: 120000 });

// The user's code ------------------------------------------------------------

async function streamChat(model) {
  const stream = await client.chat.completions.create({
    model,
    messages: [{ role: "user", content: "Stream a long answer, please." }],
    stream: true,
    stream_options: { include_usage: true },
  });
  const parts = [];
  let finish = null;
  let usage = null;
  for await (const chunk of stream) {
    const choice = chunk.choices[0];
    if (choice) {
      const content = choice.delta?.content;
      if (content) parts.push(content);
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    if (chunk.usage) usage = chunk.usage;
  }
  return { text: parts.join(""), count: parts.length, finish, usage };
}

// The harness ----------------------------------------------------------------

function cpuSeconds() {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

async function oneRun(n) {
  if (globalThis.gc) {
    globalThis.gc();
    globalThis.gc();
  }
  const c0 = cpuSeconds();
  const t0 = performance.now();
  let r;
  let bad = null;
  try {
    r = await streamChat(`sim:chunks=${n}`);
    if (r.count !== n) bad = `${r.count} content chunks, want ${n}`;
    else if (r.text !== "tok ".repeat(n)) bad = `text of ${r.text.length} chars differs from N x 'tok '`;
    else if (r.finish !== "stop") bad = `finish_reason ${r.finish}`;
    else if (!r.usage || r.usage.completion_tokens !== n) bad = "usage does not say N tokens";
  } catch (e) {
    bad = `error: ${e}`;
  }
  const cpu = cpuSeconds() - c0;
  const wall = (performance.now() - t0) / 1000;
  return { bad, count: r ? r.count : 0, bytes: r ? Buffer.byteLength(r.text) : 0, wall, cpu };
}

for (let i = 0; i < WARMUP_RUNS; i++) {
  const { bad } = await oneRun(WARMUP_N);
  if (bad) {
    process.stderr.write(`client_openai: warm-up run failed: ${bad}\n`);
    console.log(`RESULT name=openai-node ok=0 why=${JSON.stringify(bad)}`);
    process.exit(1);
  }
}

let best = null;
for (let r = 1; r <= RUNS; r++) {
  const x = await oneRun(N);
  process.stderr.write(
    `  openai-node  run ${r}: ${x.count} chunks, ${x.bytes} bytes, wall ${x.wall.toFixed(3)} s, ` +
      `cpu ${x.cpu.toFixed(3)} s${x.bad ? `  FAILED: ${x.bad}` : ""}\n`,
  );
  if (x.bad) {
    console.log(`RESULT name=openai-node ok=0 why=${JSON.stringify(x.bad)}`);
    process.exit(1);
  }
  if (!best || x.cpu < best.cpu) best = x;
}

process.stderr.write(`  (openai ${VERSION}, node ${process.version})\n`);
console.log(
  `RESULT name=openai-node ok=1 chunks=${best.count} bytes=${best.bytes} ` +
    `wall=${best.wall.toFixed(4)} cpu=${best.cpu.toFixed(4)}`,
);
