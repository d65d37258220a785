// extract.mjs - the chat-completions schemas of OpenAI's openapi.yaml, as
// one JSON Schema (draft 2020-12) document for tests/openapi_spec.lua.
//
//   cd tests/tools/openapi && npm ci && node extract.mjs [openapi.yaml] [out.json | -]
//
// Defaults: ../shared/openai-openapi/openapi.yaml beside the repository
// (SOURCE.md there names its commit and version) and
// tests/fixtures/openapi/chat.json; "-" writes to stdout. Output is
// deterministic, so the committed file can be compared with a fresh run.
//
// What it writes: the schemas named in ROOTS and everything they $ref,
// transitively, under "$defs" (refs rewritten from #/components/schemas/X
// to #/$defs/X), with the OpenAPI-isms a JSON Schema validator would read
// differently rewritten (see tests/fixtures/openapi/README.md):
//   nullable: true         -> anyOf: [<the node>, {type: "null"}]; nullable: false dropped
//                             (OpenAPI 3.1 has no `nullable`: left in, a validator
//                             ignores it, or rejects the schema in strict mode)
//   example: v             -> examples: [v]   (the 2020-12 annotation)
//   discriminator          -> dropped: an annotation on a oneOf that validates alone
//   x-* extensions         -> dropped (x-oaiMeta, x-stainless-const, ...: annotations)
// Any other keyword outside draft 2020-12 stops the extraction, so a newer
// openapi.yaml with a new OpenAPI-ism cannot slip through unnoticed.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parse } from "yaml";

// SLM_OPENAPI_ROOTS (a comma list) replaces them: the Batch API's
// fixture (tests/fixtures/openapi/batch.json) is these plus Batch,
// OpenAIFile and ListBatchesResponse.
const ROOTS = process.env.SLM_OPENAPI_ROOTS ? process.env.SLM_OPENAPI_ROOTS.split(",") : [
  "CreateChatCompletionRequest",
  "CreateChatCompletionResponse",
  "CreateChatCompletionStreamResponse",
  "ErrorResponse",
];

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "..", "..", "..");
const src = process.argv[2] || path.resolve(repo, "..", "shared", "openai-openapi", "openapi.yaml");
const dest = process.argv[3] || path.join(repo, "tests", "fixtures", "openapi", "chat.json");

// Keywords by what their value is.
const SUB_MAP = new Set(["properties", "patternProperties", "$defs", "dependentSchemas"]);
const SUB_ONE = new Set(["items", "additionalProperties", "not", "propertyNames", "contains", "if", "then",
  "else", "unevaluatedProperties", "unevaluatedItems"]);
const SUB_LIST = new Set(["anyOf", "oneOf", "allOf", "prefixItems"]);
const PLAIN = new Set(["$ref", "$comment", "type", "enum", "const", "required", "minimum", "maximum",
  "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "pattern", "minItems",
  "maxItems", "uniqueItems", "minContains", "maxContains", "minProperties", "maxProperties",
  "dependentRequired", "format", "contentEncoding", "contentMediaType", "contentSchema",
  "title", "description", "default", "deprecated", "readOnly", "writeOnly", "examples"]);
// annotations that stay on the outside when a nullable node is wrapped
const ANNOTATIONS = ["title", "description", "default", "deprecated", "readOnly", "writeOnly", "examples"];

const stats = { schemas: 0, nullable: 0, nullable_untyped: 0, nullable_false: 0, example: 0,
  discriminator: 0, extensions: {} };

function fail(where, msg) {
  console.error(`extract: ${where}: ${msg}`);
  process.exit(1);
}

// Returns the rewritten copy of schema `s` at `where`; `refs` collects the
// component names it references.
function rewrite(s, where, refs) {
  if (typeof s === "boolean") return s;
  if (s === null || typeof s !== "object" || Array.isArray(s)) fail(where, "not a schema: " + JSON.stringify(s));
  const out = {};
  let nullable = false;
  for (const [k, v] of Object.entries(s)) {
    if (k.startsWith("x-")) {
      stats.extensions[k] = (stats.extensions[k] || 0) + 1;
    } else if (k === "nullable") {
      if (v === true) nullable = true;
      else if (v === false) stats.nullable_false++;
      else fail(where, "nullable is not a boolean");
    } else if (k === "example") {
      stats.example++;
      out.examples = [...(out.examples || s.examples || []), v];
    } else if (k === "examples") {
      if (!Array.isArray(v)) fail(where, "examples is not a list");
      out.examples = [...v, ...(out.examples || [])];
    } else if (k === "discriminator") {
      stats.discriminator++;
      if (!s.oneOf && !s.anyOf) fail(where, "discriminator without oneOf/anyOf");
    } else if (k === "$ref") {
      const m = /^#\/components\/schemas\/([^/]+)$/.exec(v);
      if (!m) fail(where, "unsupported $ref " + v);
      refs.add(m[1]);
      out.$ref = "#/$defs/" + m[1];
    } else if (SUB_MAP.has(k)) {
      out[k] = {};
      for (const [name, sub] of Object.entries(v)) out[k][name] = rewrite(sub, `${where}/${k}/${name}`, refs);
    } else if (SUB_ONE.has(k)) {
      out[k] = rewrite(v, `${where}/${k}`, refs);
    } else if (SUB_LIST.has(k)) {
      if (!Array.isArray(v)) fail(where, k + " is not a list");
      out[k] = v.map((sub, i) => rewrite(sub, `${where}/${k}/${i}`, refs));
    } else if (PLAIN.has(k)) {
      out[k] = v;
    } else {
      fail(where, `keyword '${k}' is not JSON Schema 2020-12 and has no rewrite rule`);
    }
  }
  if (!nullable) return out;
  stats.nullable++;
  const t = out.type;
  if (t === undefined) stats.nullable_untyped++;
  if (t === "null" || (Array.isArray(t) && t.includes("null"))) return out;
  const wrapped = {};
  for (const a of ANNOTATIONS) {
    if (a in out) { wrapped[a] = out[a]; delete out[a]; }
  }
  wrapped.anyOf = [out, { type: "null" }];
  return wrapped;
}

function commitOf(yamlPath) {
  try {
    const text = fs.readFileSync(path.join(path.dirname(yamlPath), "SOURCE.md"), "utf8");
    const m = /commit ([0-9a-f]{7,40})/.exec(text);
    return m ? m[1] : "unknown";
  } catch {
    return "unknown";
  }
}

const doc = parse(fs.readFileSync(src, "utf8"), { maxAliasCount: -1 });
const all = doc?.components?.schemas;
if (!all) fail(src, "no components.schemas");

const defs = {};
const todo = [...ROOTS];
while (todo.length > 0) {
  const name = todo.shift();
  if (name in defs) continue;
  if (!(name in all)) fail(name, "referenced but not defined");
  const refs = new Set();
  defs[name] = rewrite(all[name], name, refs);
  stats.schemas++;
  for (const r of refs) if (!(r in defs)) todo.push(r);
}
const sorted = {};
for (const name of Object.keys(defs).sort()) sorted[name] = defs[name];

const result = {
  $schema: "https://json-schema.org/draft/2020-12/schema",
  $id: "urn:lua-slm:openai-openapi:chat",
  $comment: `Extracted from OpenAI's openapi.yaml (openai/openai-openapi, commit ${commitOf(src)}, `
    + `info.version ${doc.info?.version}, MIT license) by tests/tools/openapi/extract.mjs: `
    + `${ROOTS.join(", ")} and every schema they reference, with OpenAPI-only keywords rewritten `
    + `(see tests/fixtures/openapi/README.md).`,
  $defs: sorted,
};
const text = JSON.stringify(result, null, 2) + "\n";
if (dest === "-") {
  process.stdout.write(text);
} else {
  fs.mkdirSync(path.dirname(dest), { recursive: true });
  fs.writeFileSync(dest, text);
}
const ext = Object.entries(stats.extensions).map(([k, n]) => `${k} ${n}`).join(", ");
console.error(`extract: ${stats.schemas} schemas; nullable: ${stats.nullable} rewritten `
  + `(${stats.nullable_untyped} without type), ${stats.nullable_false} false dropped; `
  + `example: ${stats.example}; discriminator: ${stats.discriminator}; extensions dropped: ${ext}`);
