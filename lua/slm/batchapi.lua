-- slm.batchapi: chat requests through the provider's Batch API
-- (OpenAI-compatible /files and /batches): half the price, results within
-- the completion window instead of at once.
--
--   local job = slm.batchapi.job{ client = c, dir = "jobs/tickets",
--     requests = { { custom_id = "slm-<row key>", body = { messages = {...} } }, ... } }
--   job:submit()                     -- upload the JSONL, create the batch(es)
--   job:wait{ on_progress = fn }     -- poll until every batch is finished
--   job:collect()                    -- download output and error files
--   local results = job:results()    -- custom_id -> Response | Error
--   job:run()                        -- the three above
--   job:resume()                     -- failed/expired rows in new batches, then run
--   slm.batchapi.open(c, "jobs/tickets") -- the same job in a later process
--
-- Results are matched to requests by custom_id, never by the order of the
-- output file.  A job over `max_requests` (50,000) requests or `max_bytes`
-- (200 MB) is split into several batches.  Each row is in at most one
-- live batch, and a row with a result is never sent again.
--
-- The ledger: a directory holding ledger.json (the job, its batches, their
-- files, which rows each holds, which batches were collected; rewritten
-- atomically after every step), requests.jsonl (the request lines, written
-- once) and results.jsonl (the collected lines, appended).  Everything a
-- later process needs to go on is there.  See docs/ARCHITECTURE.md.
--
-- Costs: the model's prices (slm.models) times its `batch_factor`
-- (default M.BATCH_FACTOR = 0.5, OpenAI's Batch API discount), or the
-- job's `price_factor` option.  An output line's usage is checked as a
-- direct reply's (decode.usage, the request's max_tokens as the cap); where
-- it is missing or not to be trusted it is counted from the request and the
-- reply (flagged usage.estimated, res.usage_problem).
local json = require "slm.json"
local errors = require "slm.errors"
local decode = require "slm.decode"
local models = require "slm.models"
local retry = require "slm.retry"

local type, ipairs, pairs, tostring, tonumber, error, pcall, setmetatable, format, concat, min, sort =
  type, ipairs, pairs, tostring, tonumber, error, pcall, setmetatable, string.format, table.concat,
  math.min, table.sort
local open_file, rename, remove = io.open, os.rename, os.remove

local M = {}

M.ENDPOINT = "/v1/chat/completions"
M.MAX_REQUESTS = 50000              -- requests per batch (OpenAI's limit)
M.MAX_BYTES = 200 * 1024 * 1024     -- bytes per input file (OpenAI's limit)
M.BATCH_FACTOR = 0.5                -- share of the list price a batch costs
M.FORMAT = "slm-batch-ledger/1"

local TERMINAL = { completed = true, failed = true, expired = true, cancelled = true }
M.TERMINAL = TERMINAL

------------------------------------------------------------------ the API

local function api(client, spec)
  local res, err = client:request(spec)
  if not res then return nil, err end
  return res.json or res.body
end

--- Upload a JSONL text for a batch: -> File object | nil, err
function M.upload(client, data, filename)
  return api(client, { method = "POST", path = "/files", multipart = {
    { name = "purpose", value = "batch" },
    { name = "file", filename = filename or "batch.jsonl", value = data, type = "application/jsonl" },
  } })
end

--- The batch made of an input file, if there is one (the newest
-- `pages` x 100 batches are looked at): -> Batch object | nil (none
-- found), or nil, err when the list could not be read (then nobody knows
-- whether the batch exists)
function M.find_by_file(client, file_id, pages)
  local after
  for _ = 1, pages or 5 do
    local list, err = M.list(client, { limit = 100, after = after })
    if not list then return nil, err end
    if type(list) ~= "table" or type(list.data) ~= "table" then
      return nil, errors.new("protocol", "the batch list is not a list", { status = 0 })
    end
    for _, b in ipairs(list.data) do
      if type(b) == "table" and b.input_file_id == file_id then return b end
    end
    if list.has_more ~= true or #list.data == 0 then return nil end
    after = list.data[#list.data].id
  end
  return nil
end

--- Create a batch of an uploaded file: -> Batch object | nil, err.
-- Creating is not idempotent: a retry after a reply that was lost could
-- make a second batch of the same rows, paid twice.  So before each retry
-- the batches are searched for one made of this file, and that one is
-- taken.
function M.create(client, file_id, opts)
  opts = opts or {}
  local spec = { method = "POST", path = "/batches", max_retries = 0, body = {
    input_file_id = file_id, endpoint = opts.endpoint or M.ENDPOINT, completion_window = "24h",
    metadata = opts.metadata,
  } }
  local tries = 0
  while true do
    tries = tries + 1
    local b, err = api(client, spec)
    if b then return b end
    if tries > (opts.max_retries or client.max_retries) or not retry.should_retry(err) then
      -- even a failure that is not retried may have made the batch
      if err.kind == "connect" or err.kind == "timeout" then
        local found = M.find_by_file(client, file_id)
        if found then return found end
      end
      return nil, err
    end
    local found = M.find_by_file(client, file_id)
    if found then return found end
    client.runtime.sleep(retry.delay(err, tries - 1))
  end
end

function M.retrieve(client, id) return api(client, { path = "/batches/" .. id }) end
function M.cancel(client, id) return api(client, { method = "POST", path = "/batches/" .. id .. "/cancel", body = {} }) end

--- List batches (newest first): -> ListBatchesResponse | nil, err
function M.list(client, opts)
  opts = opts or {}
  return api(client, { path = "/batches", query = { limit = opts.limit, after = opts.after } })
end

--- The content of a file (an output or error file): -> text | nil, err
function M.content(client, file_id)
  return api(client, { path = "/files/" .. file_id .. "/content", raw = true })
end

------------------------------------------------------------------ ids and lines

--- A custom_id from a row key (deterministic; at most 64 bytes).
function M.custom_id(key)
  if type(key) ~= "string" or key == "" then error("slm.batchapi.custom_id: expected a non-empty string key", 2) end
  local id = "slm-" .. key
  if #id > 64 then id = "slm-" .. require("slm.core").sha256(key):sub(1, 40) end
  return id
end

local function body_key(body)
  return require("slm.core").sha256(json.encode(body)):sub(1, 32)
end

-- The request line of one row.
local function line_of(custom_id, body, endpoint)
  return json.encode({ custom_id = custom_id, method = "POST", url = endpoint, body = body })
end

--- Split rows (each { custom_id, line }) into batches of at most
-- max_requests lines and max_bytes bytes: -> list of lists, too_big (rows
-- whose one line is over max_bytes).
function M.split(rows, max_requests, max_bytes)
  local groups, cur, bytes, too_big = {}, {}, 0, {}
  for _, r in ipairs(rows) do
    local n = #r.line + 1
    if n > max_bytes then
      too_big[#too_big + 1] = r
    else
      if #cur >= max_requests or bytes + n > max_bytes then
        groups[#groups + 1] = cur
        cur, bytes = {}, 0
      end
      cur[#cur + 1] = r
      bytes = bytes + n
    end
  end
  if #cur > 0 then groups[#groups + 1] = cur end
  return groups, too_big
end

------------------------------------------------------------------ results

--- What one row costs through the Batch API.
function M.cost(model, usage, factor)
  local m = models.find(model)
  local usd = models.cost(m or model, usage)
  if not usd then return nil end
  return usd * (factor or (m and m.batch_factor) or M.BATCH_FACTOR)
end

-- The request body a row sent (requests.jsonl, read once), or nil.
local function body_of(job, custom_id)
  local bodies = job.bodies
  -- (read again when the job has gained rows since)
  if not bodies or bodies[0] ~= #job.ledger.order then
    bodies = { [0] = #job.ledger.order }
    local ok, lines = pcall(job.request_lines, job)
    for i, id in ipairs(ok and job.ledger.order or {}) do
      local dok, line = pcall(json.decode, lines[i] or "")
      if dok and type(line) == "table" and type(line.body) == "table" then bodies[id] = line.body end
    end
    job.bodies = bodies
  end
  return bodies[custom_id]
end

-- An output or error line -> Response | Error (kind from its status and
-- error, like a direct call's).
local function result_of(obj, job)
  local set = job.client:_secrets()
  local model = job.model_of and job.model_of[obj.custom_id]
  local resp, e = decode.nn(obj.response), decode.nn(obj.error)
  if type(resp) == "table" and resp.status_code == 200 and type(resp.body) == "table"
      and type(resp.body.choices) == "table" then
    local res, why = decode.response(resp.body)
    if not res then
      return errors.new("protocol", "malformed chat completion in the output file: " .. why, { status = 200 })
    end
    local info = models.find(res.model or model)
    -- the provider's usage, checked as a direct reply's is (more output
    -- than the request allowed cannot have been produced); where it is
    -- missing or not to be trusted (NaN, -1, 1e15), counted by us: a row
    -- is never priced as free because its usage lied
    local body = body_of(job, obj.custom_id)
    local guard = require "slm.guard"
    local cap = body and guard.max_out(body)
    local usage, problem = decode.usage(res.raw_usage, info and info.context,
      cap and cap * (tonumber(body.n) or 1))
    if not usage or problem then
      usage = usage or {}
      if not usage.prompt_tokens then
        -- (a part that cannot be counted, audio or a file: the worst case)
        local m = model or res.model
        local n, ci = 0, nil
        if body then n, ci = guard.prompt_tokens(body, m) end
        usage.prompt_tokens = guard.worst_prompt(n, ci, m) or n
      end
      usage.completion_tokens = usage.completion_tokens or guard.completion_tokens(res, model or res.model)
      usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
      usage.estimated = true
      res.usage_problem = problem and ("the provider's usage was not used (" .. problem .. "): counted instead")
        or "the output line carried no usage: counted"
    end
    res.usage = usage
    res.cost = M.cost(res.model, usage, job.price_factor) or M.cost(model, usage, job.price_factor)
    res.attempts = 1
    res.requested_model = model or res.model
    res.request_id = decode.nn(resp.request_id)
    res.custom_id = obj.custom_id
    res.via = "batch"
    return res
  end
  if type(resp) == "table" and type(resp.status_code) == "number" then
    local err = decode.provider_error(resp.status_code, resp.body, nil, model, set)
    err.custom_id = obj.custom_id
    return err
  end
  if type(e) == "table" then
    local code = decode.nn(e.code)
    local kind = code == "batch_expired" and "timeout" or code == "batch_cancelled" and "cancelled" or "server"
    if type(e.kind) == "string" and errors.KINDS[e.kind] then kind = e.kind end
    return errors.new(kind, tostring(decode.nn(e.message) or code or "the request failed"),
      { status = 0, code = code, custom_id = obj.custom_id, model = model })
  end
  return errors.new("protocol", "an output line with neither a response nor an error", { status = 0 })
end

--- Parse an output or error file: -> { [custom_id] = Response | Error },
-- bad (lines that could not be read).  Matched by custom_id only.
function M.parse(text, job)
  local out, bad = {}, 0
  for line in text:gmatch("[^\n]+") do
    if line:find("%S") then
      local ok, obj = pcall(json.decode, line)
      if ok and type(obj) == "table" and type(obj.custom_id) == "string" then
        out[obj.custom_id] = result_of(obj, job)
      else
        bad = bad + 1
      end
    end
  end
  return out, bad
end

------------------------------------------------------------------ the ledger

local read_all = require("slm.fileio").read_all

-- Write a whole file atomically: a temporary file renamed over it.
local function write_atomic(path, data)
  local tmp = path .. ".tmp"
  local f, err = open_file(tmp, "wb")
  if not f then return nil, err end
  local ok, werr = f:write(data)
  if ok then ok, werr = f:flush() end
  f:close()
  if not ok then remove(tmp) return nil, werr end
  local rok, rerr = rename(tmp, path)
  if not rok then remove(tmp) return nil, rerr end
  return true
end

local function mkdir_p(dir)
  local ok = os.execute("mkdir -p '" .. dir:gsub("'", "'\\''") .. "'")
  return ok == true or ok == 0
end

local Job = {}
Job.__index = Job
Job.__name = "slm.batchapi.Job"
M.Job = Job

local function ledger_error(msg)
  return errors.new("invalid_request", "slm.batchapi: ledger: " .. msg, { status = 0 })
end

function Job:save()
  local L = self.ledger
  L.updated_at = os.time()
  local ok, err = write_atomic(self.dir .. "/ledger.json", json.encode(L))
  if not ok then error("slm.batchapi: cannot write the ledger in " .. self.dir .. ": " .. tostring(err), 0) end
end

-- Append collected lines to results.jsonl (flushed before the ledger says
-- the batch was collected: a crash in between collects it again, harmlessly).
-- A write that fails (a full disk) raises: the ledger must not say the
-- batch was collected while its results are not on disk.
local function append_results(self, lines)
  if #lines == 0 then return end
  local path = self.dir .. "/results.jsonl"
  local f, err = open_file(path, "ab")
  if not f then error("slm.batchapi: cannot write " .. path .. ": " .. tostring(err), 0) end
  local ok, werr = f:write(concat(lines, "\n"), "\n")
  if ok then ok, werr = f:flush() end
  local cok, cerr = f:close()
  if not ok or not cok then error("slm.batchapi: cannot write " .. path .. ": " .. tostring(werr or cerr), 0) end
end

local OPTIONS = { client = "table", dir = "string", requests = "table", max_requests = "number",
  max_bytes = "number", metadata = "table", price_factor = "number", endpoint = "string", id = "string",
  poll_interval = "number", max_poll_interval = "number" }

local function check_opts(opts, where)
  if type(opts) ~= "table" then error(where .. ": expected an options table", 3) end
  for k, v in pairs(opts) do
    local want = OPTIONS[k]
    if not want then error(where .. ": unknown option '" .. tostring(k) .. "'", 3) end
    if type(v) ~= want then error(format("%s: option '%s' must be a %s, got %s", where, k, want, type(v)), 3) end
  end
  if not opts.client then error(where .. ": option 'client' is required", 3) end
  if not opts.dir then error(where .. ": option 'dir' (the ledger's directory) is required", 3) end
end

local function new_job(opts, ledger)
  local self = setmetatable({
    client = opts.client, dir = opts.dir, ledger = ledger,
    max_requests = opts.max_requests or M.MAX_REQUESTS, max_bytes = opts.max_bytes or M.MAX_BYTES,
    price_factor = opts.price_factor or ledger.price_factor,
    poll_interval = opts.poll_interval or 5, max_poll_interval = opts.max_poll_interval or 60,
    metadata = opts.metadata,
    lines = false, model_of = {}, results_cache = false,
  }, Job)
  for id, r in pairs(ledger.rows) do self.model_of[id] = r.model end
  return self
end

--- A new job, or the one already in `dir` with the requests it does not
-- hold yet added: -> job.  Raises on misuse (duplicate custom_ids, a
-- directory that holds no ledger of ours).
function M.job(opts)
  check_opts(opts, "slm.batchapi.job")
  local reqs = opts.requests
  if not reqs then error("slm.batchapi.job: option 'requests' is required (or use slm.batchapi.open)", 2) end
  local endpoint = opts.endpoint or M.ENDPOINT
  local rows, order, lines, seen = {}, {}, {}, {}
  local client = opts.client
  for i, r in ipairs(reqs) do
    if type(r) ~= "table" or type(r.body) ~= "table" then
      error(format("slm.batchapi.job: request %d must be a table with a 'body'", i), 2)
    end
    local body = {}
    for k, v in pairs(r.body) do body[k] = v end
    body.model = body.model or client.model
    body.stream = nil
    local id = r.custom_id or ("slm-" .. body_key(body))
    if type(id) ~= "string" or id == "" then error(format("slm.batchapi.job: request %d: bad custom_id", i), 2) end
    if seen[id] then error(format("slm.batchapi.job: requests %d and %d share the custom_id '%s'", seen[id], i, id), 2) end
    seen[id] = i
    order[i] = id
    rows[id] = { model = body.model }
    lines[i] = line_of(id, body, endpoint)
  end
  local dir = opts.dir
  local existing = read_all(dir .. "/ledger.json")
  if existing then
    -- the job already there: requests it does not hold are added (a
    -- changed prompt or model gives new custom_ids); the ones it holds
    -- keep their batches and results
    local job, err = M.open(client, dir, opts)
    if not job then error("slm.batchapi.job: " .. tostring(err), 2) end
    local L, known = job.ledger, job.ledger.rows
    local old_lines = job:request_lines()
    local added = {}
    for i, id in ipairs(order) do
      if not known[id] then
        added[#added + 1] = lines[i]
        L.order[#L.order + 1] = id
        known[id] = rows[id]
        job.model_of[id] = rows[id].model
        old_lines[#old_lines + 1] = lines[i]
      end
    end
    if #added > 0 then
      -- requests.jsonl first: a crash before the ledger names them leaves
      -- lines the ledger does not count, which the next open ignores
      local all = concat(old_lines, "\n") .. "\n"
      local ok, werr = write_atomic(dir .. "/requests.jsonl", all)
      if not ok then error("slm.batchapi.job: cannot write " .. dir .. "/requests.jsonl: " .. tostring(werr), 2) end
      job:save()
    end
    return job
  end
  if not mkdir_p(dir) then error("slm.batchapi.job: cannot make the directory " .. dir, 2) end
  local ok, err = write_atomic(dir .. "/requests.jsonl", concat(lines, "\n") .. "\n")
  if not ok then error("slm.batchapi.job: cannot write " .. dir .. "/requests.jsonl: " .. tostring(err), 2) end
  local ledger = {
    format = M.FORMAT,
    -- what the job sends (every request line: custom_id, model, messages,
    -- options; the endpoint, the provider), not only the custom_ids: two
    -- jobs over the same rows with another prompt or model are two jobs
    id = opts.id or require("slm.core").sha256(json.encode({ endpoint = endpoint, base_url = client.base_url or "",
      lines = json.array(lines) })):sub(1, 16),
    created_at = os.time(), endpoint = endpoint, base_url = client.base_url,
    price_factor = opts.price_factor,
    order = json.array(order), rows = rows, batches = json.array({}),
  }
  local job = new_job(opts, ledger)
  job.lines = lines
  job:save()
  return job
end

--- The job whose ledger is in `dir` (written by any earlier process):
-- -> job | nil, err
function M.open(client, dir, opts)
  opts = opts or {}
  local text = read_all(dir .. "/ledger.json")
  if not text then return nil, ledger_error("no ledger in " .. dir) end
  local ok, L = pcall(json.decode, text)
  if not ok or type(L) ~= "table" or L.format ~= M.FORMAT then
    return nil, ledger_error(dir .. "/ledger.json is not a batch ledger (" .. M.FORMAT .. ")")
  end
  local o = { client = client, dir = dir }
  for k, v in pairs(opts) do if k ~= "requests" then o[k] = v end end
  return new_job(o, L)
end

-- The request lines, by position (read back from requests.jsonl).
function Job:request_lines()
  if self.lines then return self.lines end
  local text = read_all(self.dir .. "/requests.jsonl")
  if not text then error("slm.batchapi: " .. self.dir .. "/requests.jsonl is missing", 0) end
  local lines = {}
  for line in text:gmatch("[^\n]+") do lines[#lines + 1] = line end
  if #lines < #self.ledger.order then
    error("slm.batchapi: " .. self.dir .. "/requests.jsonl does not match the ledger", 0)
  end
  for i = #self.ledger.order + 1, #lines do lines[i] = nil end
  self.lines = lines
  return lines
end

--- custom_id -> Response | Error of every collected row (results.jsonl
-- read back; a later line wins).
function Job:results()
  if self.results_cache then return self.results_cache end
  local text = read_all(self.dir .. "/results.jsonl") or ""
  local out = M.parse(text, self)
  self.results_cache = out
  return out
end

-- Rows that still need a batch: no success, not in a live batch; failed
-- ones only when `again` says so (resume).
function Job:unfinished(again)
  local L, res = self.ledger, self:results()
  local live = {}
  for _, b in ipairs(L.batches) do
    if not b.collected then
      for _, id in ipairs(b.rows) do live[id] = true end
    end
  end
  local list = {}
  for i, id in ipairs(L.order) do
    local r = res[id]
    local ok = r and not errors.is(r)
    if not ok and not live[id] and (r == nil or (again and again(r))) then list[#list + 1] = i end
  end
  return list
end

local function record_failures(self, ids, err)
  local lines = {}
  for _, id in ipairs(ids) do
    lines[#lines + 1] = json.encode({ custom_id = id, response = json.null,
      error = { code = err.code or err.kind, message = err.message, kind = err.kind } })
  end
  append_results(self, lines)
  self.results_cache = false
end

--- Entries whose batch was being created when the process that made them
-- died (Ctrl-C, SIGKILL, a lost reply: the ledger has the uploaded file
-- but no batch id): the provider may have made the batch, and run and
-- bill it.  Each is looked up by its input file; a batch found is adopted
-- (its id, its status: polled and collected as any other), else the batch
-- is created again from the same file (M.create, which looks again before
-- each retry).  A failed look-up leaves the entry as it is (its rows are
-- not sent twice): nil, err.  -> true | nil, err
function Job:adopt()
  local L = self.ledger
  for _, b in ipairs(L.batches) do
    if not b.id and not b.collected and b.input_file_id then
      local found, ferr = M.find_by_file(self.client, b.input_file_id)
      if not found and ferr then return nil, ferr end
      if not found then
        local metadata = { slm_job = L.id, slm_part = tostring(b.part) }
        for k, v in pairs(self.metadata or {}) do metadata[k] = tostring(v) end
        local err
        found, err = M.create(self.client, b.input_file_id, { endpoint = L.endpoint, metadata = metadata })
        if not found then
          b.status, b.collected, b.create_error = "not_created", true, tostring(err)
          self:save()
          return nil, err
        end
      end
      b.id, b.status, b.adopted = found.id, found.status, true
      self:save()
    end
  end
  return true
end

--- Upload and create batches for the rows that need one (`indices`:
-- positions in the request list; default every row with no result and
-- in no live batch).  -> the batches made (list) | nil, err (what was
-- made before the error is in the ledger).  A batch whose creation was
-- cut off before is adopted first (Job:adopt).
function Job:submit(indices)
  local aok, aerr = self:adopt()
  if not aok then return nil, aerr end
  indices = indices or self:unfinished()
  if #indices == 0 then return {} end
  local lines, L = self:request_lines(), self.ledger
  local rows = {}
  for _, i in ipairs(indices) do rows[#rows + 1] = { id = L.order[i], line = lines[i] } end
  local groups, too_big = M.split(rows, self.max_requests, self.max_bytes)
  if #too_big > 0 then
    local ids = {}
    for _, r in ipairs(too_big) do ids[#ids + 1] = r.id end
    record_failures(self, ids, errors.new("invalid_request", format("the request line is over the batch size limit "
      .. "of %d bytes", self.max_bytes), { status = 0, code = "request_too_large" }))
  end
  local made = {}
  for gi, g in ipairs(groups) do
    local texts, ids = {}, {}
    for j, r in ipairs(g) do texts[j] = r.line; ids[j] = r.id end
    local entry = { rows = json.array(ids), status = "uploading", collected = false,
      submitted_at = os.time(), part = #L.batches + 1 }
    local file, err = M.upload(self.client, concat(texts, "\n") .. "\n",
      format("slm-%s-%d.jsonl", L.id, entry.part))
    if not file then return nil, err end
    entry.input_file_id = file.id
    entry.bytes = file.bytes
    -- the file is in the ledger before the batch is asked for
    L.batches[#L.batches + 1] = entry
    self:save()
    local metadata = { slm_job = L.id, slm_part = tostring(entry.part) }
    for k, v in pairs(self.metadata or {}) do metadata[k] = tostring(v) end
    local b
    b, err = M.create(self.client, file.id, { endpoint = L.endpoint, metadata = metadata })
    if not b then
      entry.status, entry.collected, entry.create_error = "not_created", true, tostring(err)
      self:save()
      return nil, err
    end
    entry.id, entry.status = b.id, b.status
    self:save()
    made[gi] = b
  end
  return made
end

--- Refresh every live batch once: -> true when all are finished | nil, err
function Job:poll(on_progress)
  local L, all_done = self.ledger, true
  for _, b in ipairs(L.batches) do
    if b.id and not b.collected and not TERMINAL[b.status] then
      local obj, err = M.retrieve(self.client, b.id)
      if not obj then return nil, err end
      local changed = obj.status ~= b.status
      b.status = obj.status
      b.request_counts = obj.request_counts
      b.output_file_id = decode.nn(obj.output_file_id)
      b.error_file_id = decode.nn(obj.error_file_id)
      if decode.nn(obj.errors) then b.errors = obj.errors end
      if changed then self:save() end
      if on_progress then on_progress(obj, self) end
      if not TERMINAL[b.status] then all_done = false end
    end
  end
  return all_done
end

--- Poll until every batch is finished.  opts: interval (s, default the
-- job's poll_interval), max_interval, on_progress(batch, job), timeout (s:
-- then nil, err of kind "timeout"; the job goes on another time), stop (a
-- function asked between polls and every 0.2 s of the pauses: true ends the
-- wait with nil, err of kind "cancelled", err.stopped = true; the batches
-- go on and the ledger keeps them).
function Job:wait(opts)
  opts = opts or {}
  local rt = self.client.runtime
  local interval = opts.interval or self.poll_interval
  local max_interval = opts.max_interval or self.max_poll_interval
  local deadline = opts.timeout and (rt.now() + opts.timeout)
  local failures = 0
  local stop = opts.stop
  local function stopped()
    return errors.new("cancelled", "the wait was stopped; the ledger in " .. self.dir .. " keeps the batches",
      { status = 0, stopped = true })
  end
  while true do
    if stop and stop() then return nil, stopped() end
    local done, err = self:poll(opts.on_progress)
    if done then return true end
    if not done and err then
      -- a failed poll is not a failed job: try again after the backoff
      failures = failures + 1
      if failures > (opts.max_failures or 5) or not retry.should_retry(err) then return nil, err end
    else
      failures = 0
    end
    if deadline and rt.now() + interval > deadline then
      return nil, errors.new("timeout", "the batches were not finished within " .. opts.timeout .. " s; "
        .. "the ledger in " .. self.dir .. " keeps them", { status = 0 })
    end
    if stop then
      local t_end = rt.now() + interval
      while true do
        if stop() then return nil, stopped() end
        local left = t_end - rt.now()
        if left <= 0 then break end
        rt.sleep(min(left, 0.2))
      end
    else
      rt.sleep(interval)
    end
    interval = min(interval * 1.5, max_interval)
  end
end

-- Rows of a batch whose files held no line: their error, by the batch's end.
local function missing_error(b)
  if b.status == "expired" then
    return { code = "batch_expired", message = "the batch expired before this request ran", kind = "timeout" }
  elseif b.status == "cancelled" then
    return { code = "batch_cancelled", message = "the batch was cancelled before this request ran", kind = "cancelled" }
  elseif b.status == "failed" then
    local data = type(b.errors) == "table" and b.errors.data
    local first = type(data) == "table" and data[1]
    return { code = "batch_failed", kind = "invalid_request", message = "the batch failed validation" .. (type(first) == "table"
      and (": " .. tostring(first.message) .. (decode.nn(first.line) and (" (line " .. tostring(first.line) .. ")") or ""))
      or "") }
  end
  return { code = "missing", kind = "protocol", message = "the batch's files held no result for this request" }
end

--- Download the output and error files of finished batches not yet
-- collected, into results.jsonl: -> number of results collected | nil, err
function Job:collect()
  local aok, aerr = self:adopt()
  if not aok then return nil, aerr end
  local L, n = self.ledger, 0
  for _, b in ipairs(L.batches) do
    if b.id and not b.collected and TERMINAL[b.status] then
      local want, lines = {}, {}
      for _, id in ipairs(b.rows) do want[id] = true end
      for _, fid in ipairs{ b.output_file_id or false, b.error_file_id or false } do
        if fid then
          local text, err = M.content(self.client, fid)
          if not text then return nil, err end
          for line in text:gmatch("[^\n]+") do
            local ok, obj = pcall(json.decode, line)
            local id = ok and type(obj) == "table" and obj.custom_id
            -- only this batch's rows, each once
            if type(id) == "string" and want[id] then
              want[id] = nil
              lines[#lines + 1] = line
            end
          end
        end
      end
      local missing = missing_error(b)
      for _, id in ipairs(b.rows) do
        if want[id] then
          lines[#lines + 1] = json.encode({ custom_id = id, response = json.null, error = missing })
        end
      end
      append_results(self, lines)
      n = n + #lines
      b.collected, b.collected_at = true, os.time()
      self:save()
      self.results_cache = false
    end
  end
  return n
end

--- The kinds worth sending again: the provider's trouble, not the request's.
function M.retryable(err)
  local k = err.kind
  return k == "timeout" or k == "server" or k == "rate_limit" or k == "connect" or k == "cancelled"
    or k == "protocol"
end

--- Submit what needs it, wait, collect: -> results | nil, err
function Job:run(opts)
  local _, err = self:submit()
  if err then return nil, err end
  local ok
  ok, err = self:wait(opts)
  if not ok then return nil, err end
  ok, err = self:collect()
  if not ok then return nil, err end
  return self:results()
end

--- Send again, in new batches, the rows that failed for a reason worth a
-- retry (expired, cancelled, server errors, rate limits; `all = true`:
-- every failed row), then run.  Rows with a result are never sent again.
function Job:resume(opts)
  opts = opts or {}
  local ok, err = self:collect() -- batches finished since the last process
  if not ok then return nil, err end
  local again = opts.all and function() return true end or M.retryable
  local _
  _, err = self:submit(self:unfinished(again))
  if err then return nil, err end
  return self:run(opts)
end

--- Cancel every live batch of the job: -> true | nil, err
function Job:cancel()
  for _, b in ipairs(self.ledger.batches) do
    if b.id and not b.collected and not TERMINAL[b.status] then
      local obj, err = M.cancel(self.client, b.id)
      if not obj then return nil, err end
      b.status = obj.status
      self:save()
    end
  end
  return true
end

--- A summary: { id, rows, succeeded, failed, pending, batches = {...}, cost, usage, by_kind }
function Job:status()
  local L, res = self.ledger, self:results()
  local s = { id = L.id, dir = self.dir, rows = #L.order, succeeded = 0, failed = 0, pending = 0, cost = 0,
    prompt_tokens = 0, completion_tokens = 0, by_kind = {}, batches = {} }
  for _, id in ipairs(L.order) do
    local r = res[id]
    if r == nil then
      s.pending = s.pending + 1
    elseif errors.is(r) then
      s.failed = s.failed + 1
      s.by_kind[r.kind] = (s.by_kind[r.kind] or 0) + 1
    else
      s.succeeded = s.succeeded + 1
      s.cost = s.cost + (r.cost or 0)
      s.prompt_tokens = s.prompt_tokens + r.usage.prompt_tokens
      s.completion_tokens = s.completion_tokens + r.usage.completion_tokens
    end
  end
  for i, b in ipairs(L.batches) do
    s.batches[i] = { id = b.id, status = b.status, rows = #b.rows, input_file_id = b.input_file_id,
      output_file_id = b.output_file_id, error_file_id = b.error_file_id, collected = b.collected,
      request_counts = b.request_counts }
  end
  local keys = {}
  for k in pairs(s.by_kind) do keys[#keys + 1] = k end
  sort(keys)
  s.kinds = keys
  return s
end

return M
