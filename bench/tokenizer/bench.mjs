// bench.mjs DATADIR LIB ENCODING FILE [REPS [OPS]] - one peer library on one
// text; prints one JSON line per operation (the same fields as bench.lua).
// CPU time of this process (process.cpuUsage), best of REPS after one
// warm-up on a sample.  OPS: comma-separated, default "encode"; "count" is
// gpt-tokenizer's countTokens (a number, like slm's tok:count).
import fs from "node:fs";
import path from "node:path";

const [data, lib, enc, file, repsArg, opsArg] = process.argv.slice(2);
// LIB: gpt-tokenizer, js-tiktoken, @dqbd/tiktoken
const reps = Number(repsArg || 3);
const ops = (opsArg || "encode").split(",");
const cpu = () => { const u = process.cpuUsage(); return (u.user + u.system) / 1000; };

const t0 = cpu();
const fns = {};
if (lib === "gpt-tokenizer") {
  const m = await import(`gpt-tokenizer/encoding/${enc}`);
  const opts = { disallowedSpecial: new Set() };
  fns.encode = (s) => m.encode(s, opts);
  fns.count = (s) => m.countTokens(s, opts);
} else if (lib === "js-tiktoken") {
  const { getEncoding } = await import("js-tiktoken");
  const e = getEncoding(enc);
  fns.encode = (s) => e.encode(s, [], []);
} else if (lib === "@dqbd/tiktoken") {
  const { get_encoding } = await import("@dqbd/tiktoken");
  const e = get_encoding(enc);
  fns.encode = (s) => e.encode_ordinary(s);
} else {
  throw new Error("unknown lib " + lib);
}
for (const op of ops) {
  if (!fns[op]) throw new Error(`${lib} has no op ${op}`);
  fns[op]("warm up the loader");
}
const loadMs = cpu() - t0;

const text = fs.readFileSync(path.join(data, file), "utf8");
const bytes = Buffer.byteLength(text, "utf8");
for (const op of ops) {
  const fn = fns[op];
  fn(text.slice(0, 20000));
  let best = Infinity, tokens = 0;
  for (let i = 0; i < reps; i++) {
    if (globalThis.gc) globalThis.gc();
    const t = cpu();
    const r = fn(text);
    const ms = cpu() - t;
    tokens = typeof r === "number" ? r : r.length;
    if (ms < best) best = ms;
  }
  console.log(JSON.stringify({ lib, enc, case: file, op, ms: best, bytes, tokens }));
}
if (file === "english.txt") console.log(JSON.stringify({ lib, enc, case: "load", ms: loadMs }));
