-- tests/batchapi_openapi_spec.lua: the simulator's Batch API objects (File,
-- Batch in every status, the batch list) and the bodies inside its output
-- and error files, validated against OpenAI's own schemas
-- (tests/fixtures/openapi/batch.json: extract.mjs with SLM_OPENAPI_ROOTS)
-- by tests/tools/openapi/validate.mjs (its npm packages installed on first
-- use, as in openapi_spec).  Skipped only without node.
--
-- OpenAI's schemas type the optional members of Batch and File (output_file_id, errors, expires_at,
-- in_progress_at, ...) without null, while the API and the schema's own
-- example send them as null: top-level nulls are dropped before checking.
local cjson = require "cjson"
local H = require "tests.helpers"
local slm = require "slm"
local batchapi = slm.batchapi

local CLEAN = "unset LD_PRELOAD ASAN_OPTIONS UBSAN_OPTIONS; "
local TOOLS = H.FIXTURES .. "../tools/openapi/"
local SCHEMAS = H.FIXTURES .. "openapi/batch.json"
local OPENAPI_YAML = "../shared/openai-openapi/openapi.yaml"
local ROOTS = "CreateChatCompletionRequest,CreateChatCompletionResponse,CreateChatCompletionStreamResponse,"
  .. "ErrorResponse,Batch,OpenAIFile,ListBatchesResponse"

-- sh(cmd[, stdout_only]): the output of cmd, stderr included unless
-- stdout_only (node writes a pipe asynchronously, so extract.mjs's summary
-- on stderr can land in the middle of the JSON it prints on stdout)
local function sh(cmd, stdout_only)
  local p = assert(io.popen(CLEAN .. cmd .. (stdout_only and " 2>/dev/null" or " 2>&1")))
  local out = p:read("a")
  local ok, _, code = p:close()
  return out, ok == true, code
end

if not select(2, sh("command -v node")) then
  describe("Batch API OpenAPI conformance", function()
    pending("node is not installed (bin/setup-deps installs nodejs and npm): the Batch API objects not checked")
  end)
  return
end

local function strip_nulls(t)
  local o = {}
  for k, v in pairs(t) do if v ~= cjson.null then o[k] = v end end
  return o
end

describe("Batch API OpenAPI conformance", function()
  local up
  setup(function()
    local ok, npm_out = H.npm_ready(TOOLS, "ajv-formats")
    assert(ok, "npm ci in tests/tools/openapi failed:\n" .. tostring(npm_out))
    up = H.upstream()
  end)
  teardown(function() if up then up:stop() end end)

  it("File, Batch (every status), the list, and the output and error lines' bodies", function()
    local c = H.sim_client(up, { max_retries = 0 })
    local items = {}
    local function add(name, schema, obj)
      items[#items + 1] = { name = name, schema = schema, json_text = cjson.encode(obj) }
    end
    local function line(id, text)
      return cjson.encode({ custom_id = id, method = "POST", url = "/v1/chat/completions",
        body = { model = "gpt-4o-mini", messages = { { role = "user", content = text } } } })
    end
    local data = table.concat({ line("a", "hi"), line("b", "bad [sim:status=500]"), line("c", "there") }, "\n")
    local f = assert(batchapi.upload(c, data))
    add("file", "file", strip_nulls(f))
    local b = assert(batchapi.create(c, f.id, { metadata = { k = "v" } }))
    add("batch validating", "batch", strip_nulls(b))
    local last
    for _ = 1, 3 do
      last = assert(batchapi.retrieve(c, b.id))
      add("batch " .. last.status, "batch", strip_nulls(last))
    end
    for _, fid in ipairs{ last.output_file_id, last.error_file_id } do
      for l in assert(batchapi.content(c, fid)):gmatch("[^\n]+") do
        local o = cjson.decode(l)
        add("line " .. o.custom_id, o.response.status_code == 200 and "response" or "error", o.response.body)
      end
    end
    -- failed, cancelling, cancelled, expired
    local bad = assert(batchapi.upload(c, "not json\n"))
    add("batch failed", "batch", strip_nulls(assert(batchapi.retrieve(c, assert(batchapi.create(c, bad.id)).id))))
    local cb = assert(batchapi.create(c, f.id))
    add("batch cancelling", "batch", strip_nulls(assert(batchapi.cancel(c, cb.id))))
    add("batch cancelled", "batch", strip_nulls(assert(batchapi.retrieve(c, cb.id))))
    up:post("/__sim/batch_mode", cjson.encode({ directives = "expire=1" }))
    local eb = assert(batchapi.create(c, f.id))
    for _ = 1, 2 do eb = assert(batchapi.retrieve(c, eb.id)) end
    assert.equal("expired", eb.status)
    add("batch expired", "batch", strip_nulls(eb))
    local list = assert(batchapi.list(c, { limit = 10 }))
    local data_list = {}
    for i, x in ipairs(list.data) do data_list[i] = strip_nulls(x) end
    list.data = data_list
    add("batch list", "batch_list", list)
    -- the check can fail: a Batch with a status the spec does not know
    local broken = strip_nulls(last)
    broken.status = "done"
    add("broken batch", "batch", broken)

    local file = H.write_tmp(cjson.encode(items))
    local out = sh("SLM_OPENAPI_SCHEMAS=" .. H.q(SCHEMAS) .. " node " .. H.q(TOOLS .. "validate.mjs") .. " " .. H.q(file))
    os.remove(file)
    for _, it in ipairs(items) do
      local okline = out:find("\nok " .. it.name .. "\n", 1, true) or out:find("^ok " .. it.name .. "\n")
      if it.name == "broken batch" then
        assert.truthy(out:find("fail broken batch: /status", 1, true), out)
      else
        assert.truthy(okline, it.name .. ":\n" .. out)
      end
    end
  end)

  it("tests/fixtures/openapi/batch.json is what extract.mjs makes of openapi.yaml", function()
    if not io.open(OPENAPI_YAML, "rb") then
      pending(OPENAPI_YAML .. " is not beside the repository")
      return
    end
    local out, ok = sh("SLM_OPENAPI_ROOTS=" .. ROOTS .. " node " .. H.q(TOOLS .. "extract.mjs") .. " "
      .. H.q(OPENAPI_YAML) .. " -", true)
    assert(ok, out)
    assert(out == H.read_file(SCHEMAS), "batch.json differs from a fresh extraction")
  end)
end)
