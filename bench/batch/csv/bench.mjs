// bench.mjs FILE LABEL - one measurement: csv-parse's streaming parser
// (its default options: RFC 4180, records as arrays) reads FILE from a
// read stream, counting records, fields and field bytes (UTF-8, as the
// Lua side counts them). Prints one JSON line, as bench.lua does.
import { createReadStream, statSync } from "node:fs";
import { parse } from "csv-parse";

const [path, label = "csv-parse"] = process.argv.slice(2);
const size = statSync(path).size;
const t0 = process.hrtime.bigint();
const c0 = process.cpuUsage();
let rows = 0, fields = 0, bytes = 0;
const parser = createReadStream(path, { highWaterMark: 256 * 1024 }).pipe(parse());
for await (const rec of parser) {
  rows++;
  fields += rec.length;
  for (const v of rec) bytes += Buffer.byteLength(v, "utf8");
}
const secs = Number(process.hrtime.bigint() - t0) / 1e9;
const cu = process.cpuUsage(c0);
const cpu = (cu.user + cu.system) / 1e6;
console.log(JSON.stringify({ lib: label, engine: `node ${process.version}`, seconds: +secs.toFixed(4),
  cpu: +cpu.toFixed(4), mb_s: +(size / 1048576 / secs).toFixed(2), rows, fields, bytes }));
