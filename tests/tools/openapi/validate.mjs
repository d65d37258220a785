// validate.mjs - checks JSON texts against OpenAI's chat-completions schemas
// (tests/fixtures/openapi/chat.json, made by extract.mjs) with ajv, JSON
// Schema draft 2020-12 as OpenAPI 3.1 uses.
//
//   node validate.mjs ITEMS.json        (or - for stdin)
//
// ITEMS.json: [{"name": "...", "schema": "request"|"response"|"chunk"|"error"
// (and "batch"|"file"|"batch_list" with SLM_OPENAPI_SCHEMAS=.../batch.json),
// "json_text": "..."}, ...]. Prints one line per item, "ok NAME" or
// "fail NAME: ERRORS" (ERRORS: "; "-separated "PATH: message"), then a
// summary line. Exit status: 0 all valid, 1 some item invalid, 2 the
// schemas or the validator itself cannot be trusted (load/compile error,
// failed self-check) or bad usage.
//
// json_text is parsed with JSON.parse, so numbers are doubles: ajv checks
// types and ranges (4.94411682281e+18 is an integer to it), not digits;
// whether a big integer kept its digits is for the caller to check on the
// raw bytes (tests/openapi_spec.lua does, for seeds).
//
// Before any item, a self-check: known-good documents must pass and
// known-bad ones must fail at the expected place, so a schema that did not
// load, a $ref that resolves to nothing or a keyword skipped in silence
// cannot make everything pass.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import Ajv2020 from "ajv/dist/2020.js";
import addFormats from "ajv-formats";

const here = path.dirname(fileURLToPath(import.meta.url));
const SCHEMAS = process.env.SLM_OPENAPI_SCHEMAS
  || path.join(here, "..", "..", "fixtures", "openapi", "chat.json");
const ROOT = {
  request: "CreateChatCompletionRequest",
  response: "CreateChatCompletionResponse",
  chunk: "CreateChatCompletionStreamResponse",
  error: "ErrorResponse",
};
// compiled when the schemas hold them (tests/fixtures/openapi/batch.json)
const OPTIONAL = { batch: "Batch", file: "OpenAIFile", batch_list: "ListBatchesResponse" };

function die(msg) {
  console.log("error: " + msg);
  process.exit(2);
}

function load() {
  let doc;
  try {
    doc = JSON.parse(fs.readFileSync(SCHEMAS, "utf8"));
  } catch (e) {
    die(`cannot read the schemas ${SCHEMAS}: ${e.message}`);
  }
  // strict: true = every keyword must be known (an OpenAPI-ism the
  // extraction missed, e.g. `nullable`, is a compile error instead of being
  // ignored), unknown formats are errors, no NaN/Infinity in schemas, and
  // strictTypes/strictTuples/strictRequired too (OpenAI's chat schemas
  // pass them all). Union types (`type: [string, "null"]`) are JSON Schema.
  const ajv = new Ajv2020({ strict: true, allowUnionTypes: true, allErrors: true });
  // ajv honours OpenAPI's `nullable` beside a `type` even in strict mode;
  // JSON Schema has no such keyword and extract.mjs rewrites every one, so
  // one left over must be an error, not a silent second dialect
  ajv.removeKeyword("nullable");
  addFormats(ajv, ["uri"]);
  // OpenAI's own format: seconds since the epoch, an integer
  ajv.addFormat("unixtime", { type: "number", validate: (x) => Number.isInteger(x) && x >= 0 });
  try {
    ajv.addSchema(doc);
  } catch (e) {
    die(`the schemas do not compile: ${e.message}`);
  }
  const validators = {};
  for (const [kind, name] of Object.entries(ROOT)) {
    if (!doc.$defs || !doc.$defs[name]) die(`${SCHEMAS} has no $defs/${name}`);
    try {
      validators[kind] = ajv.compile({ $ref: `${doc.$id}#/$defs/${name}` });
    } catch (e) {
      die(`${name} does not compile: ${e.message}`);
    }
  }
  // OpenAIFile leaves out `type: object` beside its `required`: strict,
  // but without strictTypes, for these
  let loose;
  for (const [kind, name] of Object.entries(OPTIONAL)) {
    if (doc.$defs && doc.$defs[name]) {
      try {
        if (!loose) {
          loose = new Ajv2020({ strict: true, strictTypes: false, allowUnionTypes: true, allErrors: true });
          loose.removeKeyword("nullable");
          addFormats(loose, ["uri"]);
          loose.addFormat("unixtime", { type: "number", validate: (x) => Number.isInteger(x) && x >= 0 });
          loose.addSchema(doc);
        }
        validators[kind] = loose.compile({ $ref: `${doc.$id}#/$defs/${name}` });
      } catch (e) {
        die(`${name} does not compile: ${e.message}`);
      }
    }
  }
  return validators;
}

function describe(errors) {
  const lines = [];
  for (const e of errors || []) {
    let extra = "";
    if (e.params) {
      if (e.params.allowedValues) extra = " " + JSON.stringify(e.params.allowedValues);
      else if (e.params.additionalProperty) extra = " '" + e.params.additionalProperty + "'";
      else if (e.params.passingSchemas) extra = " (passing: " + JSON.stringify(e.params.passingSchemas) + ")";
    }
    const line = `${e.instancePath || "/"}: ${e.message}${extra} (${e.schemaPath})`;
    if (!lines.includes(line)) lines.push(line);
  }
  return lines;
}

function check(validators, kind, text) {
  const v = validators[kind];
  if (!v) return { ok: false, errors: [`unknown schema '${kind}' (one of ${Object.keys(ROOT).join(", ")})`] };
  let value;
  try {
    value = JSON.parse(text);
  } catch (e) {
    return { ok: false, errors: ["not JSON: " + e.message] };
  }
  if (v(value)) return { ok: true, errors: [] };
  return { ok: false, errors: describe(v.errors) };
}

// The self-check: [schema, document, expected instancePath or null for valid]
const USER = { role: "user", content: "hi" };
const GOOD_MSG = { role: "assistant", content: "hello", refusal: null };
const SELF = [
  ["request", { model: "gpt-4o-mini", messages: [USER] }, null],
  ["request", { model: "gpt-4o-mini", messages: [USER], tools: [], seed: 1, stop: null }, null],
  ["request", { model: "gpt-4o-mini", messages: [USER], tools: {} }, "/tools"],
  ["request", { model: "gpt-4o-mini" }, "/"],
  ["request", { model: "gpt-4o-mini", messages: [] }, "/messages"],
  ["request", { model: "gpt-4o-mini", messages: [USER], temperature: "hot" }, "/temperature"],
  ["request", { model: "gpt-4o-mini", messages: [{ role: "wizard", content: "x" }] }, "/messages/0"],
  ["request", { model: "gpt-4o-mini", messages: [USER], n: 1.5 }, "/n"],
  ["request", { model: "gpt-4o-mini", messages: [USER], stop: ["a", "b", "c", "d", "e"] }, "/stop"],
  ["response", { id: "x", object: "chat.completion", created: 1, model: "m",
    choices: [{ index: 0, message: GOOD_MSG, logprobs: null, finish_reason: "stop" }] }, null],
  ["response", { id: "x", object: "chat.completion", created: 1, model: "m" }, "/"],
  ["response", { id: "x", object: "chat.completion", created: 1, model: "m",
    choices: [{ index: 0, message: GOOD_MSG, logprobs: null, finish_reason: "done" }] }, "/choices/0/finish_reason"],
  ["chunk", { id: "x", object: "chat.completion.chunk", created: 1, model: "m",
    choices: [{ index: 0, delta: { content: "a" }, logprobs: null, finish_reason: null }] }, null],
  ["chunk", { id: "x", object: "chat.completion", created: 1, model: "m", choices: [] }, "/object"],
  ["error", { error: { message: "m", type: "t", param: null, code: null } }, null],
  ["error", { error: { message: "m" } }, "/error"],
];

const BATCH = { id: "b", object: "batch", endpoint: "/v1/chat/completions", input_file_id: "f",
  completion_window: "24h", status: "validating", created_at: 1 };
const SELF_OPTIONAL = [
  ["batch", BATCH, null],
  ["batch", { ...BATCH, status: "done" }, "/status"],
  ["batch", { ...BATCH, request_counts: { total: 1, completed: 1 } }, "/request_counts"],
  ["file", { id: "f", object: "file", bytes: 1, created_at: 1, filename: "a.jsonl", purpose: "batch",
    status: "processed" }, null],
  ["file", { id: "f", object: "file", bytes: 1, created_at: 1, filename: "a.jsonl", purpose: "nope",
    status: "processed" }, "/purpose"],
];

function selfCheck(validators) {
  for (const c of SELF_OPTIONAL) if (validators[c[0]]) SELF.push(c);
  for (const [kind, doc, where] of SELF) {
    const v = validators[kind];
    const ok = v(doc);
    const label = `${kind} ${JSON.stringify(doc)}`;
    if (where === null) {
      if (!ok) die(`self-check: a valid ${label} is rejected: ${describe(v.errors).join("; ")}`);
    } else if (ok) {
      die(`self-check: an invalid ${label} is accepted: the schemas cannot be trusted`);
    } else if (!v.errors.some((e) => (e.instancePath || "/") === where)) {
      die(`self-check: ${label} is rejected, but not at ${where}: ${describe(v.errors).join("; ")}`);
    }
  }
}

const file = process.argv[2];
if (!file) die("usage: node validate.mjs ITEMS.json | -");
let items;
try {
  items = JSON.parse(fs.readFileSync(file === "-" ? 0 : file, "utf8"));
} catch (e) {
  die(`cannot read the items ${file}: ${e.message}`);
}
if (!Array.isArray(items) || items.length === 0) die("the items must be a non-empty JSON array");

const validators = load();
selfCheck(validators);
let bad = 0;
for (const [i, item] of items.entries()) {
  const name = item && typeof item.name === "string" ? item.name : `#${i + 1}`;
  if (!item || typeof item.json_text !== "string") {
    bad++;
    console.log(`fail ${name}: the item has no json_text string`);
    continue;
  }
  const r = check(validators, item.schema, item.json_text);
  if (r.ok) {
    console.log(`ok ${name}`);
  } else {
    bad++;
    console.log(`fail ${name}: ${r.errors.join("; ")}`);
  }
}
console.log(`${items.length - bad} valid, ${bad} invalid (self-check: ${SELF.length} cases passed)`);
process.exit(bad > 0 ? 1 : 0);
