// bench.mjs DATADIR LIB ENCODING FILE [REPS] - one peer library on one text;
// prints one JSON line (the same fields as bench.lua).  CPU time of this
// process (process.cpuUsage), best of REPS after one warm-up on a sample.
import fs from "node:fs";
import path from "node:path";

const [data, lib, enc, file, repsArg] = process.argv.slice(2);
// LIB: gpt-tokenizer, "gpt-tokenizer count", js-tiktoken, @dqbd/tiktoken
const reps = Number(repsArg || 3);
const cpu = () => { const u = process.cpuUsage(); return (u.user + u.system) / 1000; };

const t0 = cpu();
let encode;
if (lib === "gpt-tokenizer") {
  const m = await import(`gpt-tokenizer/encoding/${enc}`);
  const opts = { disallowedSpecial: new Set() };
  encode = (s) => m.encode(s, opts);
} else if (lib === "gpt-tokenizer count") {
  // countTokens returns a number, like slm's tok:count
  const m = await import(`gpt-tokenizer/encoding/${enc}`);
  const opts = { disallowedSpecial: new Set() };
  encode = (s) => ({ length: m.countTokens(s, opts) });
} else if (lib === "js-tiktoken") {
  const { getEncoding } = await import("js-tiktoken");
  const e = getEncoding(enc);
  encode = (s) => e.encode(s, [], []);
} else if (lib === "@dqbd/tiktoken") {
  const { get_encoding } = await import("@dqbd/tiktoken");
  const e = get_encoding(enc);
  encode = (s) => e.encode_ordinary(s);
} else {
  throw new Error("unknown lib " + lib);
}
encode("warm up the loader");
const loadMs = cpu() - t0;

const text = fs.readFileSync(path.join(data, file), "utf8");
const bytes = Buffer.byteLength(text, "utf8");
encode(text.slice(0, 20000));
let best = Infinity, tokens = 0;
for (let i = 0; i < reps; i++) {
  if (globalThis.gc) globalThis.gc();
  const t = cpu();
  const ids = encode(text);
  const ms = cpu() - t;
  tokens = ids.length;
  if (ms < best) best = ms;
}
console.log(JSON.stringify({ lib, enc, case: file, op: "encode", ms: best, bytes, tokens }));
if (file === "english.txt") console.log(JSON.stringify({ lib, enc, case: "load", ms: loadMs }));
