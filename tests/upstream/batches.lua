-- tests/upstream/batches.lua: the simulator's Files and Batch API
-- (OpenAI-compatible): POST /v1/files (multipart/form-data, purpose=batch),
-- GET /v1/files/{id}, GET /v1/files/{id}/content, POST /v1/batches,
-- GET /v1/batches/{id}, POST /v1/batches/{id}/cancel, GET /v1/batches.
-- Each request line of a batch is answered by the chat simulator
-- (sim.batch_reply), with the directives found in its prompt
-- ("[sim:status=500,fail=1]") or its model name ("sim:..."). Documented in
-- README.md ("Batch API").
--
-- Everything lives in the `sim_batch` shared dict (files, batches) and the
-- `sim` one (counters), so that several workers see the same batches;
-- stores never evict (safe_set): a full dict is an error reply.

local cjson = require "cjson.safe"
local scenarios = require "scenarios"

local ngx = ngx
local find, sub, match, gmatch, format = string.find, string.sub, string.match, string.gmatch, string.format
local concat, sort, floor, tonumber, tostring, type, ipairs, pairs, next =
  table.concat, table.sort, math.floor, tonumber, tostring, type, ipairs, pairs, next
local encode, decode, null = cjson.encode, cjson.decode, cjson.null

local M = {}

local ENDPOINT = "/v1/chat/completions"
local ENDPOINTS = { ["/v1/chat/completions"] = true } -- the ones this simulator runs
local KNOWN_ENDPOINTS = { ["/v1/responses"] = true, ["/v1/embeddings"] = true, ["/v1/completions"] = true,
  ["/v1/chat/completions"] = true, ["/v1/moderations"] = true }
local MAX_FILE = 16 * 1024 * 1024  -- bytes of one uploaded file (bounded: the dict is 64 MB)
local MAX_LINES = 50000            -- requests per batch, as OpenAI
local STAGES = { "validating", "in_progress", "finalizing", "completed" }

local function store() return ngx.shared.sim_batch end
local function counters() return ngx.shared.sim end

local function send(status, body, ctype)
  ngx.status = status
  ngx.header["Content-Type"] = ctype or "application/json"
  ngx.header["Content-Length"] = #body
  ngx.print(body)
end

local function fail(status, message, code, param, etype)
  return send(status, encode({ error = {
    message = message, type = etype or "invalid_request_error", param = param or null, code = code or null,
  } }))
end

local function put(key, value)
  local ok, err = store():safe_set(key, value)
  if not ok then return nil, "the simulator's batch store is full (" .. tostring(err) .. ")" end
  return true
end

local function get_json(key)
  local s = store():get(key)
  return s and decode(s) or nil
end

local function read_body() return require("sim").read_body() end

-- Settings for batches created from now on (POST /__sim/batch_mode).
local function settings()
  return get_json("settings") or {}
end

------------------------------------------------------------------ files

-- multipart/form-data -> { name = { data = ..., filename = ... } } | nil, why
local function multipart(raw, ctype)
  local boundary = ctype and (match(ctype, 'boundary="([^"]+)"') or match(ctype, "boundary=([^;%s]+)"))
  if not boundary then return nil, "expected a multipart/form-data body with a boundary" end
  local delim = "--" .. boundary
  local parts = {}
  local pos = find(raw, delim, 1, true)
  if not pos then return nil, "the multipart body has no part" end
  pos = pos + #delim
  while true do
    if sub(raw, pos, pos + 1) == "--" then break end -- the closing delimiter
    if sub(raw, pos, pos + 1) ~= "\r\n" then return nil, "malformed multipart delimiter line" end
    local head_end = find(raw, "\r\n\r\n", pos + 2, true)
    if not head_end then return nil, "a multipart part has no header end" end
    local head = sub(raw, pos + 2, head_end - 1)
    local nxt = find(raw, "\r\n" .. delim, head_end + 4, true)
    if not nxt then return nil, "a multipart part is not closed" end
    local disp = match(head, "[Cc]ontent%-[Dd]isposition:%s*([^\r\n]*)")
    local name = disp and match(disp, ';%s*name="([^"]*)"')
    if not name then return nil, "a multipart part has no name" end
    parts[name] = { data = sub(raw, head_end + 4, nxt - 1), filename = match(disp, 'filename="([^"]*)"') }
    pos = nxt + 2 + #delim
  end
  return parts
end

local function new_file(purpose, filename, data)
  local id = "file-sim" .. counters():incr("file_ids", 1, 0)
  local meta = { id = id, object = "file", bytes = #data, created_at = ngx.time(), expires_at = null,
    filename = filename, purpose = purpose, status = "processed", status_details = null }
  local ok, err = put("fc:" .. id, data)
  if ok then ok, err = put("fm:" .. id, encode(meta)) end
  if not ok then
    store():delete("fc:" .. id)
    return nil, err
  end
  return meta
end

local function upload()
  local limit = tonumber(settings().max_file_bytes) or MAX_FILE
  local raw = read_body()
  if #raw > limit + 4096 then
    return fail(413, format("The file is larger than the simulator's limit of %d bytes.", limit), "file_too_large")
  end
  local parts, why = multipart(raw, ngx.var.http_content_type)
  if not parts then return fail(400, why, "invalid_multipart") end
  local purpose = parts.purpose and parts.purpose.data
  if not purpose then return fail(400, "Missing required parameter: 'purpose'.", "missing_required_parameter", "purpose") end
  if purpose ~= "batch" then
    return fail(400, "This simulator takes files with purpose 'batch' only, not '" .. purpose .. "'.",
      "invalid_value", "purpose")
  end
  local file = parts.file
  if not file then return fail(400, "Missing required parameter: 'file'.", "missing_required_parameter", "file") end
  if #file.data > limit then
    return fail(413, format("The file is larger than the simulator's limit of %d bytes.", limit), "file_too_large")
  end
  counters():incr("batch_uploads", 1, 0)
  local meta, err = new_file("batch", file.filename or "upload.jsonl", file.data)
  if not meta then return fail(507, err, "storage_full", nil, "server_error") end
  return send(200, encode(meta))
end

local function file_meta(id)
  local meta = store():get("fm:" .. id)
  if not meta then return fail(404, "No such File object: " .. id, "not_found", "id") end
  return send(200, meta)
end

local function file_content(id)
  local data = store():get("fc:" .. id)
  if not data then return fail(404, "No such File object: " .. id, "not_found", "id") end
  counters():incr("batch_downloads", 1, 0)
  return send(200, data, "application/octet-stream")
end

------------------------------------------------------------------ batches

-- The public Batch object (hidden fields start with "_").
local function public(b)
  local o = {}
  for k, v in pairs(b) do
    if sub(k, 1, 1) ~= "_" then o[k] = v end
  end
  return encode(o)
end

local function save(b)
  return put("b:" .. b.id, encode(b))
end

-- The directives of one request line: its model name's ("sim:...") and
-- every "[sim:...]" in the text of its messages.
local function line_directives(body)
  local spec = {}
  if type(body.model) == "string" then
    local m = match(body.model, "^sim:(.*)$")
    if m then spec[#spec + 1] = m end
  end
  if type(body.messages) == "table" then
    for _, msg in ipairs(body.messages) do
      local c = type(msg) == "table" and msg.content
      local texts = {}
      if type(c) == "string" then texts[1] = c
      elseif type(c) == "table" then
        for _, p in ipairs(c) do
          if type(p) == "table" and type(p.text) == "string" then texts[#texts + 1] = p.text end
        end
      end
      for _, t in ipairs(texts) do
        for d in gmatch(t, "%[sim:([^%]]*)%]") do spec[#spec + 1] = d end
      end
    end
  end
  return concat(spec, ",")
end

-- Validate the input file: -> lines | nil, errors (BatchError list)
local function validate(b)
  local data = store():get("fc:" .. b.input_file_id)
  if not data then
    return nil, { { code = "missing_file", message = "The input file is gone.", param = "input_file_id", line = null } }
  end
  local lines, errs, seen, n = {}, {}, {}, 0
  for text in gmatch(data, "[^\n]+") do
    n = n + 1
    if find(text, "%S") then
      local obj = decode(text)
      local function bad(code, message, param)
        if #errs < 100 then errs[#errs + 1] = { code = code, message = message, param = param or null, line = n } end
      end
      if type(obj) ~= "table" then
        bad("invalid_json_line", "This line is not parseable as valid JSON.")
      elseif type(obj.custom_id) ~= "string" or obj.custom_id == "" then
        bad("missing_required_parameter", "Missing required parameter: 'custom_id'.", "custom_id")
      elseif seen[obj.custom_id] then
        bad("duplicate_custom_id", "The custom_id for this request is a duplicate of another request. "
          .. "The custom_id parameter must be unique for each request in a batch.", "custom_id")
      elseif obj.method ~= "POST" then
        bad("invalid_method", "The method for this request must be 'POST'.", "method")
      elseif obj.url ~= b.endpoint then
        bad("mismatched_endpoint", format("The provided url '%s' does not match the batch endpoint '%s'.",
          tostring(obj.url), b.endpoint), "url")
      elseif type(obj.body) ~= "table" then
        bad("missing_required_parameter", "Missing required parameter: 'body'.", "body")
      else
        seen[obj.custom_id] = true
        lines[#lines + 1] = obj
      end
    end
  end
  if #lines + #errs > MAX_LINES then
    errs[#errs + 1] = { code = "too_many_requests", message = format("A batch holds at most %d requests.", MAX_LINES),
      param = null, line = null }
  end
  if #lines == 0 and #errs == 0 then
    errs[1] = { code = "empty_file", message = "The input file has no request.", param = null, line = null }
  end
  if #errs > 0 then return nil, errs end
  return lines
end

-- A stable order that is not the input's: by the md5 of the custom_id.
local function shuffled(list)
  local keyed = {}
  for i, v in ipairs(list) do keyed[i] = { ngx.md5(v.custom_id), v } end
  sort(keyed, function(a, c) return a[1] < c[1] end)
  local out = {}
  for i, kv in ipairs(keyed) do out[i] = kv[2] end
  return out
end

local EXPIRED = { code = "batch_expired",
  message = "This request could not be executed before the completion window expired." }

-- Run the lines: the output and error files, the counts, usage.
local function execute(b, lines)
  local sim = require "sim"
  local d = counters()
  local limit = #lines
  local x = tonumber(b._sc.expire)
  if b._sc.expire == true then x = floor(#lines / 2) end
  if x then limit = x end
  local out, errs = {}, {}
  local completed, failed = 0, 0
  local usage = { input_tokens = 0, output_tokens = 0 }
  for i, line in ipairs(lines) do
    local rid = "batch_req_sim" .. d:incr("batch_req_ids", 1, 0)
    if i > limit then
      errs[#errs + 1] = { id = rid, custom_id = line.custom_id, response = null, error = EXPIRED }
      failed = failed + 1
    else
      local spec = line_directives(line.body)
      local sc = scenarios.parse(spec)
      if sc.fail then
        local attempt = d:incr("bk:" .. line.custom_id .. "#" .. spec, 1, 0)
        if attempt > (tonumber(sc.fail) or 0) then sc = {} end
      end
      d:incr("batch_lines", 1, 0)
      d:incr("bq:" .. line.custom_id, 1, 0)
      local status, body = sim.batch_reply(line.body, sc, d:incr("ids", 1, 0))
      local entry = { id = rid, custom_id = line.custom_id,
        response = { status_code = status, request_id = "req_sim_" .. rid, body = "__SIM_BODY__" }, error = null }
      local text = encode(entry):gsub('"__SIM_BODY__"', function() return body end)
      if status == 200 then
        d:incr("bok:" .. line.custom_id, 1, 0)
        completed = completed + 1
        out[#out + 1] = { custom_id = line.custom_id, text = text }
        local r = decode(body)
        local u = type(r) == "table" and r.usage
        if type(u) == "table" then
          usage.input_tokens = usage.input_tokens + (tonumber(u.prompt_tokens) or 0)
          usage.output_tokens = usage.output_tokens + (tonumber(u.completion_tokens) or 0)
        end
      else
        failed = failed + 1
        errs[#errs + 1] = { custom_id = line.custom_id, text = text }
      end
    end
  end
  local function file_of(list, kind)
    if #list == 0 then return null end
    local texts = {}
    for i, e in ipairs(shuffled(list)) do texts[i] = e.text or encode(e) end
    local meta, err = new_file("batch_output", format("%s_%s.jsonl", b.id, kind), concat(texts, "\n") .. "\n")
    if not meta then ngx.log(ngx.ERR, "sim: ", err) return null end
    return meta.id
  end
  b.output_file_id = file_of(out, "output")
  b.error_file_id = file_of(errs, "error")
  b.request_counts = { total = #lines, completed = completed, failed = failed }
  b.usage = { input_tokens = usage.input_tokens, input_tokens_details = { cached_tokens = 0 },
    output_tokens = usage.output_tokens, output_tokens_details = { reasoning_tokens = 0 },
    total_tokens = usage.input_tokens + usage.output_tokens }
  return limit < #lines
end

-- Move a batch along: one stage per `polls` GETs (default 1), or per
-- `step_ms` milliseconds since it was created.
local function advance(b)
  local st = b.status
  if st == "cancelling" then
    b.status, b.cancelled_at = "cancelled", ngx.time()
    return true
  end
  local stage
  for i, s in ipairs(STAGES) do if s == st then stage = i end end
  if not stage or stage == #STAGES then return false end
  b._polls = (b._polls or 0) + 1
  local target
  local step_ms = tonumber(b._sc.step_ms)
  if step_ms then
    target = 1 + floor((ngx.now() * 1000 - b._t0) / step_ms)
  else
    target = 1 + floor(b._polls / (tonumber(b._sc.polls) or 1))
  end
  if target <= stage then return true end -- polls counted
  -- one stage at a time
  local now = ngx.time()
  if stage == 1 then
    local lines, errs = validate(b)
    if not lines then
      b.status, b.failed_at = "failed", now
      b.errors = { object = "list", data = errs }
      return true
    end
    b.status, b.in_progress_at = "in_progress", now
    if type(lines[1].body.model) == "string" then b.model = lines[1].body.model end
    b.request_counts = { total = #lines, completed = 0, failed = 0 }
  elseif stage == 2 then
    local lines = validate(b) or {}
    -- only one worker runs the lines
    if not store():add("run:" .. b.id, true) then return false end
    local expired = execute(b, lines)
    if expired then
      b.status, b.expired_at = "expired", now
    else
      b.status, b.finalizing_at = "finalizing", now
    end
  elseif stage == 3 then
    b.status, b.completed_at = "completed", now
  end
  return true
end

local function load(id)
  return get_json("b:" .. id)
end

local function create()
  local raw = read_body()
  local req = decode(raw)
  if type(req) ~= "table" then
    return fail(400, "We could not parse the JSON body of your request.", "invalid_json")
  end
  if type(req.input_file_id) ~= "string" then
    return fail(400, "Missing required parameter: 'input_file_id'.", "missing_required_parameter", "input_file_id")
  end
  if not KNOWN_ENDPOINTS[req.endpoint] then
    return fail(400, format("Invalid value: '%s'. Supported values are: '/v1/responses', '/v1/chat/completions', "
      .. "'/v1/embeddings', '/v1/completions' and '/v1/moderations'.", tostring(req.endpoint)), "invalid_value", "endpoint")
  end
  if not ENDPOINTS[req.endpoint] then
    return fail(400, "This simulator runs batches of " .. ENDPOINT .. " only.", "unsupported_value", "endpoint")
  end
  if req.completion_window ~= "24h" then
    return fail(400, format("Invalid value: '%s'. Supported values are: '24h'.", tostring(req.completion_window)),
      "invalid_value", "completion_window")
  end
  local meta = get_json("fm:" .. req.input_file_id)
  if not meta then return fail(404, "No such File object: " .. req.input_file_id, "not_found", "input_file_id") end
  if meta.purpose ~= "batch" then
    return fail(400, "The input file must have purpose 'batch'.", "invalid_value", "input_file_id")
  end
  local metadata = req.metadata
  if metadata ~= nil and metadata ~= null then
    if type(metadata) ~= "table" then return fail(400, "'metadata' must be an object.", "invalid_type", "metadata") end
    local n = 0
    for k, v in pairs(metadata) do
      n = n + 1
      if type(v) ~= "string" or #k > 64 or #v > 512 then
        return fail(400, "metadata values are strings of at most 512 characters, keys at most 64.",
          "invalid_value", "metadata")
      end
    end
    if n > 16 then return fail(400, "metadata holds at most 16 pairs.", "invalid_value", "metadata") end
  else
    metadata = null
  end
  local spec = ngx.var.http_x_sim_batch or settings().directives or ""
  if metadata ~= null and metadata.sim then spec = spec .. "," .. metadata.sim end
  local sc = scenarios.parse(spec)
  local seq = counters():incr("batch_ids", 1, 0)
  local now = ngx.time()
  local b = {
    id = format("batch_sim%06d", seq), object = "batch", endpoint = req.endpoint, model = null,
    errors = null, input_file_id = req.input_file_id, completion_window = "24h", status = "validating",
    output_file_id = null, error_file_id = null, created_at = now, in_progress_at = null,
    expires_at = now + 86400, finalizing_at = null, completed_at = null, failed_at = null, expired_at = null,
    cancelling_at = null, cancelled_at = null, request_counts = { total = 0, completed = 0, failed = 0 },
    metadata = metadata,
    _sc = sc, _polls = 0, _t0 = ngx.now() * 1000, _seq = seq,
  }
  local ok, err = save(b)
  if not ok then return fail(507, err, "storage_full", nil, "server_error") end
  counters():incr("batch_creates", 1, 0)
  -- lose_reply=N: the first N creates make the batch, then drop the
  -- connection without a reply (a client must not make it twice)
  local lose = tonumber(settings().lose_reply)
  if lose and counters():incr("batch_lost_replies", 1, 0) <= lose then return ngx.exit(444) end
  return send(200, public(b))
end

local function retrieve(id)
  local b = load(id)
  if not b then return fail(404, "No such Batch object: " .. id, "not_found", "id") end
  -- flaky_polls=N: the batch's first N polls answer 500 (and do not move it)
  local flaky = tonumber(b._sc.flaky_polls)
  if flaky and counters():incr("bf:" .. id, 1, 0) <= flaky then
    return fail(500, "The server had an error while processing your request.", "server_error", nil, "server_error")
  end
  if advance(b) then
    local ok, err = save(b)
    if not ok then return fail(507, err, "storage_full", nil, "server_error") end
  end
  return send(200, public(b))
end

local function cancel(id)
  local b = load(id)
  if not b then return fail(404, "No such Batch object: " .. id, "not_found", "id") end
  if b.status == "validating" or b.status == "in_progress" then
    -- the lines have not run yet: none of them will
    store():add("run:" .. b.id, true)
    b.status, b.cancelling_at = "cancelling", ngx.time()
    local total = b.request_counts.total
    b.request_counts = { total = total, completed = 0, failed = 0 }
    save(b)
  elseif b.status ~= "cancelling" and b.status ~= "cancelled" then
    return fail(409, format("Cannot cancel a batch with status '%s'.", b.status), "batch_not_cancellable")
  end
  counters():incr("batch_cancels", 1, 0)
  return send(200, public(b))
end

local function list()
  local args = ngx.req.get_uri_args()
  local limit = tonumber(args.limit) or 20
  if limit < 1 or limit > 100 then return fail(400, "limit must be between 1 and 100.", "invalid_value", "limit") end
  local all = {}
  for _, k in ipairs(store():get_keys(0)) do
    if sub(k, 1, 2) == "b:" then
      local b = load(sub(k, 3))
      if b then all[#all + 1] = b end
    end
  end
  sort(all, function(a, c) return a._seq > c._seq end) -- newest first
  local start = 1
  if type(args.after) == "string" then
    for i, b in ipairs(all) do if b.id == args.after then start = i + 1 end end
  end
  local data = {}
  for i = start, #all do
    if #data == limit then break end
    data[#data + 1] = "__B" .. i .. "__"
  end
  local body = encode({ object = "list", data = #data > 0 and data or "__EMPTY__",
    first_id = #data > 0 and all[start].id or null, last_id = #data > 0 and all[start + #data - 1].id or null,
    has_more = start + #data <= #all })
  body = body:gsub('"__EMPTY__"', "[]"):gsub('"__B(%d+)__"', function(i) return public(all[tonumber(i)]) end)
  return send(200, body)
end

------------------------------------------------------------------ control

-- POST /__sim/batch_mode {directives = "polls=3,expire=2", max_file_bytes = n}:
-- the directives of every batch created from now on (a batch's own
-- X-Sim-Batch header wins; metadata.sim adds to it).
local function mode()
  if ngx.req.get_method() ~= "POST" then return fail(405, "Method not allowed: use POST.", "method_not_allowed") end
  local req = decode(read_body())
  if type(req) ~= "table" then return fail(400, "expected a JSON object", "invalid_json") end
  local ok, err = put("settings", encode(req))
  if not ok then return fail(507, err, "storage_full") end
  return send(200, '{"ok":true}')
end

--- The batch counters: GET /__sim/batch_stats.
local function stats()
  local d = counters()
  local lines_by_id, ok_by_id = {}, {}
  for _, k in ipairs(d:get_keys(0)) do
    local p = sub(k, 1, 3)
    if p == "bq:" then lines_by_id[sub(k, 4)] = d:get(k)
    elseif p == "bok" then ok_by_id[sub(k, 5)] = d:get(k) end
  end
  local n = 0
  local s = store()
  if s then
    for _, k in ipairs(s:get_keys(0)) do if sub(k, 1, 2) == "b:" then n = n + 1 end end
  end
  return send(200, encode({
    uploads = d:get("batch_uploads") or 0, creates = d:get("batch_creates") or 0,
    cancels = d:get("batch_cancels") or 0, downloads = d:get("batch_downloads") or 0,
    lines = d:get("batch_lines") or 0, batches = n,
    lines_by_custom_id = next(lines_by_id) and lines_by_id or nil,
    ok_by_custom_id = next(ok_by_id) and ok_by_id or nil,
  }))
end

function M.reset()
  local s = store()
  if s then s:flush_all() s:flush_expired() end
end

function M.handle(uri)
  if not store() then
    return fail(500, "the simulator has no 'sim_batch' shared dict", "sim_config", nil, "server_error")
  end
  local method = ngx.req.get_method()
  local path = match(uri, "^.-(/v1/.*)$") or uri
  path = path:gsub("/+$", "")
  if uri == "/__sim/batch_mode" then return mode() end
  if uri == "/__sim/batch_stats" then return stats() end
  if path == "/v1/files" then
    if method == "POST" then return upload() end
    return fail(405, "Use POST to upload a file.", "method_not_allowed")
  end
  local id, rest = match(path, "^/v1/files/([^/]+)(.*)$")
  if id then
    if method ~= "GET" then return fail(405, "Use GET.", "method_not_allowed") end
    if rest == "" then return file_meta(id) end
    if rest == "/content" then return file_content(id) end
  end
  if path == "/v1/batches" then
    if method == "POST" then return create() end
    if method == "GET" then return list() end
    return fail(405, "Use GET or POST.", "method_not_allowed")
  end
  id, rest = match(path, "^/v1/batches/([^/]+)(.*)$")
  if id then
    if rest == "" and method == "GET" then return retrieve(id) end
    if rest == "/cancel" and method == "POST" then return cancel(id) end
  end
  return fail(404, "Unknown endpoint " .. method .. " " .. uri, "unknown_url")
end

return M
