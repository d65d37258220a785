// bench.mjs DATADIR LABEL [REPS] - minisearch on the benchmark's passages
// and queries (gen_data.lua); prints one JSON line (the same fields as
// bench.lua) and writes the top 5 ids of every query to
// DATADIR/top-LABEL.json, and, for the overlap only, the top 5 with plain
// BM25 at slm.bm25's parameters to DATADIR/top-LABEL-plain.json, and with
// slm.bm25's own terms (analyzed.json) as its tokens, plain BM25, to
// DATADIR/top-LABEL-same.json.
//
// Configuration: one field (text), the id, the language stored; minisearch's
// own tokenizer (space and punctuation, Unicode-aware) and its default
// scoring (BM25+: k 1.2, b 0.7, d 0.5), no prefix or fuzzy search; a
// processTerm that lowercases, folds ё into е and drops slm.bm25's stop
// words (the same list, from stopwords.json). No stemming: minisearch has
// none, and we give it none (README.md says what that does to the overlap).
import fs from "node:fs";
import path from "node:path";
import MiniSearch from "minisearch";

const [data, label, repsArg] = process.argv.slice(2);
const reps = Number(repsArg || 5);
const now = () => Number(process.hrtime.bigint()) / 1e6; // ms
const cpu = () => { const u = process.cpuUsage(); return (u.user + u.system) / 1000; };

const docs = fs.readFileSync(path.join(data, "passages.jsonl"), "utf8")
  .split("\n").filter((l) => l).map((l) => JSON.parse(l));
const queries = JSON.parse(fs.readFileSync(path.join(data, "queries.json"), "utf8"));
const stop = new Set(JSON.parse(fs.readFileSync(path.join(data, "stopwords.json"), "utf8")));

const processTerm = (term) => {
  const t = term.toLowerCase().replace(/ё/g, "е");
  return stop.has(t) ? null : t;
};

if (globalThis.gc) { globalThis.gc(); globalThis.gc(); }
const mem0 = process.memoryUsage().heapUsed;
const t0 = now(), c0 = cpu();
const ms = new MiniSearch({ fields: ["text"], storeFields: ["lang"], processTerm });
ms.addAll(docs);
const buildMs = now() - t0, buildCpuMs = cpu() - c0;
if (globalThis.gc) { globalThis.gc(); globalThis.gc(); }
const heapMb = (process.memoryUsage().heapUsed - mem0) / 1048576;

const top5 = (opts) => queries.map((q) => ms.search(q, opts).slice(0, 5).map((r) => r.id));
const top = top5(undefined); // warm-up, and the results
const times = queries.map((q) => {
  const t = now();
  for (let i = 0; i < reps; i++) ms.search(q).slice(0, 5);
  return (now() - t) / reps * 1e3;
});
const mean = times.reduce((a, b) => a + b, 0) / times.length;
times.sort((a, b) => a - b);
const pct = (p) => times[Math.max(0, Math.ceil(times.length * p) - 1)];

fs.writeFileSync(path.join(data, `top-${label}.json`), JSON.stringify(top) + "\n");
const plain = top5({ bm25: { k: 1.2, b: 0.75, d: 0 } });
fs.writeFileSync(path.join(data, `top-${label}-plain.json`), JSON.stringify(plain) + "\n");
// The scoring alone: minisearch fed slm.bm25's terms (analyzed.json), plain BM25.
const analyzedPath = path.join(data, "analyzed.json");
if (fs.existsSync(analyzedPath)) {
  const analyzed = JSON.parse(fs.readFileSync(analyzedPath, "utf8"));
  const termsOf = new Map();
  docs.forEach((d, i) => termsOf.set(d.text, analyzed.passages[i]));
  queries.forEach((q, i) => termsOf.set(q, analyzed.queries[i]));
  const same = new MiniSearch({
    fields: ["text"], tokenize: (text) => termsOf.get(text) || [], processTerm: (t) => t,
  });
  same.addAll(docs);
  const sameTop = queries.map((q) => same.search(q, { bm25: { k: 1.2, b: 0.75, d: 0 } }).slice(0, 5).map((r) => r.id));
  fs.writeFileSync(path.join(data, `top-${label}-same.json`), JSON.stringify(sameTop) + "\n");
}
console.log(JSON.stringify({
  lib: label, passages: ms.documentCount, queries: queries.length,
  build_ms: buildMs, build_cpu_ms: buildCpuMs, heap_mb: heapMb,
  p50_us: pct(0.5), p95_us: pct(0.95), mean_us: mean,
}));
