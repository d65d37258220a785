--- slm.jobs: the resumable batch runner behind `slm classify|extract|
-- generate|summarize|batch` (and the provider Batch API path, which reuses
-- its keys, ledger, result rows, usage log, summary and exit codes).
--
-- A job:
--   local job = jobs.new{
--     task = "classify",             -- the task's name (part of every key)
--     version = jobs.version(text),  -- hash of the labels / schema / template (part of every key)
--     model = "gpt-4o-mini",         -- part of every key
--     params = { max_tokens = 20 },  -- anything else that changes a reply (part of every key)
--     columns = { "label", "confidence", "review" },  -- the task's result columns, in order
--     output = "out.csv",            -- nil: stdout, and no ledger
--     format = "csv" | "jsonl",      -- the output's
--     ledger = path,                 -- default output .. ".ledger"
--     usage_log = path | false,      -- default output .. ".usage.jsonl"; false: none
--     log_prompts = false,
--   }
--   job:add(row)  for every input row, in input order:
--     row = { n = <input row number>, fields = { name -> value }, names = { ...in input order },
--             input = <what goes to the model: a string or a table, JSON-encodable> }
--     or, for a row that cannot run, row.bad = { kind = "ragged" | "missing_column" | "parse" | ..., message }
--   local summary, code = job:run{ call = fn, client = c, concurrency = 8, progress = bool | "plain" }
--     fn(row, client) -> result, info | nil, err
--        result: column -> value (the task's columns); info / err carry
--        usage, cost, attempts, calls, latency, ttft, model (what the usage log records)
--
-- Row key: core.sha256 of the JSON (keys sorted) of { task, version, model,
-- params, input }; rows with the same key are one request (the same reply
-- goes to each).  A changed prompt, schema, template, model or parameter
-- gives new keys: those rows run again, the others are kept.
--
-- Ledger (`OUT.ledger`): an append-only JSON-lines file of finished rows,
--   { "key": hex, "status": "ok" | "error", "result": { column -> value },
--     "error_kind": kind, "error": message, "cost": usd, "tokens": n, "model": name }
-- each written with one write and flushed as it finishes, fsync'd at most
-- every `sync_every` rows (64) or 1 s and at the end.  A SIGKILL at any
-- instant leaves at most a torn last line, which is skipped when the
-- ledger is read again (a newline is written first so the next record
-- starts clean): finished rows are never lost, in-flight rows are redone.
-- The output is never appended to: it is rebuilt from the input and the
-- ledger at the end of every run (also an interrupted or budget-stopped
-- one), written to OUT.tmp and renamed over OUT, so it holds each finished
-- row exactly once, in input order, and never a half-written file.
-- On a rerun a key found in the ledger with status "ok", or with an error
-- of the row itself (FINAL: context_length, invalid_request, validation,
-- length), is not sent again; rows that failed for a reason outside the
-- row (network, server, rate limit, timeout, auth, budget) are.
--
-- Result rows: the input's columns (fields) as they were, then the task's
-- columns, then status ("ok" | "error"), error_kind, error, cost, tokens.
-- A task column whose name the input already has is written "slm_<name>"
-- ("slm_slm_<name>" when the input has that too, and so on: an input
-- column is never overwritten).
--
-- Usage log: one JSON line per request a row's task made (a task that
-- re-asked, regenerated or read a long document in chunks writes one line
-- for each of its requests, numbered by `call` out of `calls`; a raw chat
-- request has one; a row refused before sending, its prompt over the
-- context, has one line with calls = 0 and nothing spent):
--   { time (UTC, ISO 8601), run, task, model (the answering one),
--     prompt_tokens, completion_tokens, tokens, cost, latency, ttft,
--     attempts (of that request: its retries), call, calls,
--     outcome ("ok" | error kind, of that request; a single line: the row's),
--     row_outcome (on per-request lines: the row's, "ok" | error kind: a
--     request can succeed and its row fail validation), id (the row's id column),
--     prompt (only with log_prompts, on the row's first line: the row's input,
--     its JSON when not a string),
--     via (in a --via batch run: "batch" for the request the Batch API
--     answered, "direct" for a task's follow-up sent at once; absent otherwise) }
-- never the row key; appended and flushed per line.
--
-- A finished job's rerun: see "a finished job" below (the ledger's last
-- record { complete = stamp, ... } and M.finished).
--
-- Summary (job:run's first value): { rows, done_before, sent (requests
-- sent: each of a task's requests, its re-asks, repairs and chunks
-- included; none for a row refused here or done before), succeeded,
-- failed, failed_by_kind = { kind -> n }, not_attempted, tokens,
-- prompt_tokens, completion_tokens, cost, seconds, stopped = nil |
-- "budget" | "interrupted" | "write_error", budget_reason (the first
-- budget refusal's message), write_error (the ledger's or usage log's
-- write that failed, naming the file) }.  succeeded, failed,
-- done_before and not_attempted count rows: every input row, a row whose
-- input repeats another's too (one request for both, its outcome theirs);
-- rows = succeeded + failed + not_attempted + the rows done before that
-- did not fail (those that did count in failed as well).  A task that
-- raises instead of returning (its own check of an argument, a bug) gives
-- an error row of kind invalid_request (final), no request counted when
-- it raised before sending.  Exit codes (job:run's second): EXIT below; a
-- write error is 1.
local core = require "slm.core"
local json = require "slm.json"
local runtime = require "slm.runtime"

local type, pairs, ipairs, tostring, pcall, format, concat, min, floor =
  type, pairs, ipairs, tostring, pcall, string.format, table.concat, math.min, math.floor

local M = {}

M.EXIT = { ok = 0, failed = 1, usage = 2, budget = 3, interrupted = 130 }

-- Errors of the row itself: a rerun would fail the same way (and may have
-- been paid for), so it is not sent again.
M.FINAL = { context_length = true, invalid_request = true, validation = true, length = true }

M.STATUS_COLUMNS = { "status", "error_kind", "error", "cost", "tokens" }

--- A short content hash (for a template's, schema's or label set's version).
function M.version(content)
  return core.sha256(content):sub(1, 16)
end

--- The key of one input under a job's task, version, model and params.
function M.key(job, input)
  return core.sha256(json.encode({ task = job.task, version = job.version or "", model = job.model or "",
    params = job.params or {}, input = input }))
end

------------------------------------------------------------------ ledger

local Ledger = {}
Ledger.__index = Ledger

--- Open (or create) the ledger at path: -> ledger | nil, message.
-- opts.read_only: read it, never write (a dry run); sync_every (64).
-- ledger.done: key -> the last record of that key.
function M.ledger(path, opts)
  opts = opts or {}
  local done, torn = {}, false
  local f = io.open(path, "rb")
  local size = 0
  if f then
    -- only what seek says is there: a device (/dev/full, /dev/zero) reads
    -- without end, and holds no records
    local len = f:seek("end") or 0
    local data = ""
    if len > 0 then
      f:seek("set", 0)
      data = f:read("a") or ""
    end
    f:close()
    size = #data
    torn = size > 0 and data:sub(-1) ~= "\n"
    for line in data:gmatch("[^\n]+") do
      local ok, rec = pcall(json.decode, line)
      if ok and type(rec) == "table" and type(rec.key) == "string" then done[rec.key] = rec end
    end
  end
  local fh, err
  if not opts.read_only then
    fh, err = io.open(path, "ab")
    if not fh then return nil, err end
    if torn then fh:write("\n") end
  end
  return setmetatable({ path = path, fh = fh, done = done, pending = 0, last_sync = core.now(),
    sync_every = opts.sync_every or 64, existed = size > 0 }, Ledger)
end

--- Is this key finished (not to be sent again)?
function Ledger:final(key)
  local rec = self.done[key]
  return rec ~= nil and (rec.status == "ok" or M.FINAL[rec.error_kind] == true)
end

-- "cannot write the ledger PATH: why"
local function write_error(self, err)
  return format("cannot write the ledger %s: %s", self.path, tostring(err or "write failed"))
end

--- Append a record: -> true | nil, message (the write, flush or fsync
-- failed: a full disk; the caller stops, the record may be torn).
function Ledger:add(rec)
  self.done[rec.key] = rec
  local fh = self.fh
  local ok, err = fh:write(json.encode(rec) .. "\n")
  if ok then ok, err = fh:flush() end
  if not ok then return nil, write_error(self, err) end
  self.pending = self.pending + 1
  local t = core.now()
  if self.pending >= self.sync_every or t - self.last_sync >= 1 then return self:sync(t) end
  return true
end

-- core.fsync answers nil under LuaJIT, where it cannot reach the
-- descriptor (the flush before it is what there is): not a write error.
local no_fsync = rawget(_G, "jit") ~= nil

function Ledger:sync(t)
  local ok, err = true, nil
  if self.pending > 0 and not no_fsync then ok, err = core.fsync(self.fh) end
  self.pending, self.last_sync = 0, t or core.now()
  if not ok then return nil, write_error(self, err) end
  return true
end

--- Close: -> true | nil, message (as Ledger:add).
function Ledger:close()
  local ok, err = true, nil
  if self.fh then
    ok, err = self:sync()
    local cok, cerr = self.fh:close()
    if ok and not cok then ok, err = nil, write_error(self, cerr) end
    self.fh = nil
  end
  return ok, err
end

------------------------------------------------------------------ usage log

local function iso_now()
  return os.date("!%Y-%m-%dT%H:%M:%SZ")
end

local function usage_of(x)
  local u = type(x) == "table" and type(x.usage) == "table" and x.usage or {}
  local p, c = u.prompt_tokens or 0, u.completion_tokens or 0
  return p, c
end

--- One usage-log line for a task call (info: the result's or error's
-- usage, cost, attempts, calls, latency, ttft, model).
function M.usage_line(job, info, outcome, prompt, id)
  local p, c = usage_of(info)
  info = type(info) == "table" and info or {}
  local calls = info.local_check and 0 or info.calls or 1
  return {
    time = iso_now(), run = job.run_id, task = job.task, model = info.model or job.model,
    -- cost: none for a model with no price (cost_unknown), never a made-up 0
    prompt_tokens = p, completion_tokens = c, tokens = p + c, cost = info.cost or (p + c == 0 and 0 or nil),
    cost_unknown = info.cost == nil and p + c > 0 or nil,
    latency = info.latency, ttft = info.ttft, attempts = info.local_check and 0 or info.attempts or 1,
    -- one line for the row's one request (call 1 of 1), or for a row
    -- refused before sending (calls 0, no call); the request's outcome is the row's
    call = calls == 1 and 1 or nil, calls = calls,
    outcome = outcome, row_outcome = outcome, id = id, prompt = prompt, via = job.via,
  }
end

--- The usage-log lines of a row's task call: one per request it made
-- when the task lists them (info.requests: slm.tasks' ledger), each with
-- `call` (1, 2, ...) and `calls` (how many); otherwise the one line of
-- M.usage_line (a raw chat request, or a row refused before sending).
function M.usage_lines(job, info, outcome, prompt, id)
  local reqs = type(info) == "table" and type(info.requests) == "table" and info.requests or nil
  if not reqs or #reqs == 0 or info.local_check then return { M.usage_line(job, info, outcome, prompt, id) } end
  local t, lines = iso_now(), {}
  for i, r in ipairs(reqs) do
    local p, c = r.prompt_tokens or 0, r.completion_tokens or 0
    lines[i] = {
      time = t, run = job.run_id, task = job.task, model = r.model or job.model,
      prompt_tokens = p, completion_tokens = c, tokens = p + c, cost = r.cost or (p + c == 0 and 0 or nil),
      cost_unknown = r.cost == nil and p + c > 0 or nil,
      latency = r.latency, ttft = r.ttft, attempts = r.attempts or 1, call = i, calls = #reqs,
      outcome = r.outcome, row_outcome = outcome, id = id, prompt = i == 1 and prompt or nil,
      via = job.via and (r.via or "direct") or nil,
    }
  end
  return lines
end

------------------------------------------------------------------ output

local math_type = math.type -- nil under LuaJIT
local function cell(v)
  if v == nil or v == json.null then return "" end
  if type(v) == "table" then return json.encode(v) end
  if type(v) == "number" then
    if math_type and math_type(v) == "integer" then return tostring(v) end
    if v % 1 == 0 and v > -1e15 and v < 1e15 then return format("%d", v) end
    -- the shortest text that reads back as the same double (tostring keeps
    -- 14 digits: an input's 0.1234567890123456 would change)
    if v == v and v > -math.huge and v < math.huge then return json.encode(v) end
  end
  return tostring(v)
end
M.cell = cell

-- The output's column names: the input's, then the task's and the status
-- columns, renamed slm_<name> where the input has the name already (and
-- slm_slm_<name> where it has that too, and so on).
local function out_columns(job, names)
  local have, cols, res = {}, {}, {}
  for i, n in ipairs(names) do have[n] = true; cols[i] = n end
  local function add(n)
    -- slm_<name> when the input has the name, slm_slm_<name> when it has
    -- that too, ...: an input column is never overwritten
    local as = n
    while have[as] do as = "slm_" .. as end
    have[as] = true
    cols[#cols + 1] = as
    res[#res + 1] = { n, as }
  end
  for _, n in ipairs(job.columns) do add(n) end
  for _, n in ipairs(M.STATUS_COLUMNS) do add(n) end
  return cols, res
end

-- The result part of a row: task columns + status columns, from a ledger
-- record or a bad row.
local function result_of(row, rec)
  if row.bad then
    return { status = "error", error_kind = row.bad.kind, error = row.bad.message, cost = 0, tokens = 0 }
  end
  local r = {}
  for k, v in pairs(rec.result or {}) do r[k] = v end
  r.status, r.error_kind, r.error, r.cost, r.tokens = rec.status, rec.error_kind, rec.error, rec.cost, rec.tokens
  return r
end

--- Rebuild the output from the rows and the ledger: -> rows written.
-- Rows without a finished record (not attempted, in flight) are left out.
function M.write_output(job)
  local path = job.output
  local tmp = path and path .. ".tmp"
  local fh = io.stdout
  if path then fh = assert(io.open(tmp, "wb")) end
  local names = job.names or {}
  local cols, res_cols = out_columns(job, names)
  local w
  if job.format == "csv" then
    w = assert(require("slm.csv").writer(fh))
    assert(w:row(cols))
  else
    w = assert(require("slm.jsonl").writer(fh))
  end
  local written = 0
  for _, row in ipairs(job.rows) do
    local rec = not row.bad and job.ledger_done[row.key]
    if row.bad or rec then
      local r = result_of(row, rec)
      if job.format == "csv" then
        local list = {}
        for i, n in ipairs(names) do list[i] = cell(row.fields[n]) end
        for _, p in ipairs(res_cols) do list[#list + 1] = cell(r[p[1]]) end
        assert(w:row(list))
      else
        local t = {}
        -- an error row's input text that is not UTF-8 (it could not be sent)
        -- goes out with U+FFFD in place of the bytes JSON cannot carry
        local fix = row.bad and require("slm.redact").utf8 or nil
        for k, v in pairs(row.fields or {}) do t[k] = fix and type(v) == "string" and fix(v) or v end
        for _, p in ipairs(res_cols) do
          local v = r[p[1]]
          if v == nil then v = json.null end
          t[p[2]] = v
        end
        assert(w:row(t))
      end
      written = written + 1
    end
  end
  assert(w:close())
  if path then
    assert(fh:close())
    assert(os.rename(tmp, path))
  else
    fh:flush()
  end
  return written
end

------------------------------------------------------------------ the job

local Job = {}
Job.__index = Job

function M.new(o)
  local job = setmetatable({}, Job)
  for k, v in pairs(o) do job[k] = v end
  job.rows = {}
  job.columns = job.columns or {}
  job.format = job.format or "jsonl"
  job.run_id = format("%s-%d", os.date("!%Y%m%dT%H%M%SZ"), floor(core.now() * 1000) % 100000)
  if job.output then
    job.ledger_path = job.ledger or job.output .. ".ledger"
    if job.usage_log == nil then job.usage_log = job.output .. ".usage.jsonl" end
  end
  return job
end

------------------------------------------------------------------ input

-- A CSV header that names a column twice: its values would be one
-- column's under two names (a row is read by name), so it is refused.
local function duplicate_column(names)
  local at = {}
  for i, n in ipairs(names) do
    if at[n] then
      return format("the CSV header names the column '%s' twice (columns %d and %d): rename one of them", n, at[n], i)
    end
    at[n] = i
  end
  return nil
end

--- Read an input file's rows (a path or an open file) into the job (see
-- the header for a row); slm.csv / slm.jsonl read it.
-- o: format ("csv" | "jsonl"), column (the text column, or nil), id_column,
-- limit, input_of(fields, row) -> input | nil, bad (the task's part: what
-- goes to the model, or why the row cannot run).  -> true | nil, message
-- (a file that cannot be read at all, a CSV header that names a column
-- twice; a bad row is an error row instead).
function Job:read(path, o)
  local n = 0
  local function add(row)
    n = n + 1
    if not row.bad then
      if o.column and row.fields[o.column] == nil then
        row.bad = { kind = "missing_column", message = format("line %d has no column '%s'", row.n, o.column) }
      elseif o.id_column and row.fields[o.id_column] == nil then
        row.bad = { kind = "missing_column", message = format("line %d has no column '%s'", row.n, o.id_column) }
      else
        local input, bad = o.input_of(row.fields, row)
        if input == nil then row.bad = bad else row.input = input end
      end
    end
    row.id = o.id_column and row.fields[o.id_column] or nil
    self:add(row)
    return not (o.limit and n >= o.limit)
  end
  local function message(err) return type(err) == "table" and err.message or tostring(err) end
  if o.format == "csv" then
    local csv = require "slm.csv"
    local r, err = csv.reader(path, o.csv)
    if not r then return nil, message(err) end
    local names
    for rec, rerr in r:rows() do
      if not names then
        names = r:header() or {}
        local dup = duplicate_column(names)
        if dup then r:close() return nil, dup end
      end
      if not self.names then self.names = names end
      local row = { n = (rec and rec.line) or (type(rerr) == "table" and rerr.line) or n + 1, fields = {},
        names = names }
      if not rec then
        row.bad = { kind = "parse", message = message(rerr) }
      else
        row.fields = csv.by_name(names, rec)
        if rec.ragged then
          row.bad = { kind = "ragged", message = format("line %d has %d fields, the header %d", rec.line or 0, #rec,
            #names) }
        end
      end
      if not add(row) then break end
    end
    r:close()
    if not names then
      local dup = duplicate_column(r:header() or {})
      if dup then return nil, dup end
    end
    if not self.names then self.names = r:header() or {} end
  else
    local r, err = require("slm.jsonl").reader(path)
    if not r then return nil, message(err) end
    local names, seen_name = {}, {}
    for obj, rerr, line in r:rows() do
      local row = { n = line or n + 1, fields = {} }
      if not obj then
        row.bad = { kind = "parse", message = message(rerr) }
      elseif type(obj) ~= "table" or obj[1] ~= nil then
        row.bad = { kind = "parse", message = format("line %d is not a JSON object", line or 0) }
      else
        row.fields = obj
        local keys = {}
        for k in pairs(obj) do if not seen_name[k] then keys[#keys + 1] = k end end
        table.sort(keys)
        for _, k in ipairs(keys) do seen_name[k] = true; names[#names + 1] = k end
      end
      if not add(row) then break end
    end
    r:close()
    self.names = names
  end
  return true
end

--- Add an input row (see the header); computes its key.
function Job:add(row)
  if not row.bad then
    -- text JSON cannot carry (not UTF-8: a Latin-1 "caf\233") cannot be sent:
    -- an error row for that line, the others run
    local ok, key = pcall(M.key, self, row.input)
    if ok then
      row.key = key
    else
      row.bad = { kind = "invalid_request", message = format("line %d cannot be sent: %s", row.n or 0,
        (tostring(key):gsub("^slm%.json: ", ""):gsub(" at %$%.input.*$", ""))) }
    end
  end
  self.rows[#self.rows + 1] = row
  if not self.names and row.names then self.names = row.names end
end

--- The rows to send, once per key, in input order: -> list, set of their
-- keys.  Without a ledger given, the one on disk is read (not created):
-- a dry run prices only what a run would send.
function Job:pending(ledger)
  if not ledger and self.ledger_path then
    local f = io.open(self.ledger_path, "rb")
    if f then
      f:close()
      ledger = M.ledger(self.ledger_path, { read_only = true })
    end
  end
  local todo, seen = {}, {}
  for _, row in ipairs(self.rows) do
    if not row.bad and not seen[row.key] and not (ledger and ledger:final(row.key)) then
      seen[row.key] = true
      todo[#todo + 1] = row
    end
  end
  return todo, seen
end

-- A plain progress line (stderr is not a terminal).
local function plain_line(s, total)
  return format("slm %s: %d/%d rows, %d failed, %d tokens, $%.6f, %.1f s", s.task, s.done, total, s.failed,
    s.tokens, s.cost, core.now() - s.t0)
end

--- Run the job: -> summary, exit code.  opts: call, client, concurrency
-- (8), progress (true: bar, "plain": a line every progress_every s, false),
-- progress_every (10), on_send (hook, tests), stop_on = { budget = true }.
function Job:run(opts)
  local call, client = opts.call, opts.client
  local ledger
  if self.ledger_path then
    local err
    ledger, err = M.ledger(self.ledger_path)
    if not ledger then return nil, M.EXIT.usage, "cannot open the ledger " .. self.ledger_path .. ": " .. tostring(err) end
    self.ledger_done = ledger.done
  else
    self.ledger_done = {}
  end
  local usage_fh
  if self.usage_log then
    usage_fh = io.open(self.usage_log, "ab")
    if not usage_fh then
      if ledger then ledger:close() end
      return nil, M.EXIT.usage, "cannot open the usage log " .. self.usage_log
    end
  end
  local s = { task = self.task, rows = #self.rows, done_before = 0, sent = 0, succeeded = 0, failed = 0,
    failed_by_kind = {}, not_attempted = 0, tokens = 0, prompt_tokens = 0, completion_tokens = 0, cost = 0, unpriced = 0,
    t0 = core.now(), done = 0 }
  local todo, seen = self:pending(ledger)
  for _, row in ipairs(self.rows) do
    if row.bad then
      s.failed = s.failed + 1
      s.failed_by_kind[row.bad.kind] = (s.failed_by_kind[row.bad.kind] or 0) + 1
    elseif not seen[row.key] then
      s.done_before = s.done_before + 1
    end
  end
  local total = #todo
  local bar, next_plain = nil, nil
  if opts.progress == true and total > 0 then
    bar = require("slm.progress").new(total, { label = self.task })
  elseif opts.progress == "plain" and total > 0 then
    next_plain = core.now() + (opts.progress_every or 10)
  end
  local stopped
  local nexti = 1
  local rt = runtime.default()
  local ran = {} -- key -> true: recorded by this run
  -- a write that failed (a full disk): the job stops at once, the rows
  -- recorded before are kept, the summary and the exit status say so
  local function write_failed(msg)
    s.write_error = s.write_error or msg
    stopped = "write_error"
  end
  local usage_ok = true
  local function record(row, result, info, err)
    local cost = (info and info.cost) or (err and type(err) == "table" and err.cost) or nil
    local p, c = usage_of(info or err)
    s.prompt_tokens, s.completion_tokens = s.prompt_tokens + p, s.completion_tokens + c
    s.tokens, s.cost = s.tokens + p + c, s.cost + (cost or 0)
    -- a model with no price: its cost is unknown (null in the row, counted
    -- in the summary), never a made-up 0
    if cost == nil and p + c > 0 then s.unpriced = s.unpriced + 1; cost = json.null end
    local rec = { key = row.key, cost = cost or 0, tokens = p + c, model = (info or err or {}).model or self.model }
    if result then
      rec.status, rec.result = "ok", result
      s.succeeded = s.succeeded + 1
    else
      local kind = type(err) == "table" and err.kind or "error"
      rec.status, rec.error_kind = "error", kind
      rec.error = type(err) == "table" and (err.message or tostring(err)) or tostring(err)
      s.failed = s.failed + 1
      s.failed_by_kind[kind] = (s.failed_by_kind[kind] or 0) + 1
    end
    ran[row.key] = true
    if ledger then
      local ok, werr = ledger:add(rec)
      if not ok then write_failed(werr) end
    else
      self.ledger_done[row.key] = rec
    end
    if usage_fh and usage_ok then
      local prompt = self.log_prompts and (type(row.input) == "string" and row.input or json.encode(row.input)) or nil
      local lines = M.usage_lines(self, info or err, result and "ok" or rec.error_kind, prompt, row.id)
      for i = 1, #lines do lines[i] = json.encode(lines[i]) end
      lines[#lines + 1] = ""
      local ok, werr = usage_fh:write(concat(lines, "\n"))
      if ok then ok, werr = usage_fh:flush() end
      if not ok then
        usage_ok = false
        write_failed(format("cannot write the usage log %s: %s", self.usage_log, tostring(werr)))
      end
    end
  end
  -- The requests a row's task sent: as the task lists them (a re-ask, a
  -- repair, each chunk of a long document), else one; none when it was
  -- refused before sending.
  local function requests_of(x)
    if type(x) ~= "table" then return 1 end
    if x.local_check then return 0 end
    if type(x.requests) == "table" then return #x.requests end
    return 1
  end
  local function worker()
    while nexti <= total and not stopped do
      if core.trapped() then stopped = "interrupted" break end
      local row = todo[nexti]
      nexti = nexti + 1
      -- the client the task gets counts its calls: a task that raises has
      -- sent that many requests (none: it failed before sending)
      local calls = 0
      local c = client
      if type(client) == "table" then
        -- every method runs on the client itself (its secrets are keyed
        -- by it); chat and stream are counted
        local wrap = {}
        c = setmetatable(wrap, { __newindex = client, __index = function(_, k)
          local v = client[k]
          if type(v) ~= "function" then return v end
          return function(self, ...)
            if self ~= wrap then return v(self, ...) end
            if k == "chat" or k == "stream" then calls = calls + 1 end
            return v(client, ...)
          end
        end })
      end
      local ok, result, info = pcall(call, row, c)
      local err
      if not ok then
        -- a raise (a task's own check of its input, or a bug) would raise
        -- again on a rerun: an error row of the row itself (final), with
        -- the requests it made, if any
        err, result, info = { kind = "invalid_request", message = "the task raised an error: "
          .. tostring(result):gsub("^[^:\n]*:%d+: ", ""), local_check = calls == 0 or nil,
          requests = calls > 0 and {} or nil, calls = calls }, nil, nil
        if calls > 0 then
          for i = 1, calls do err.requests[i] = { outcome = "invalid_request" } end
        end
      elseif result == nil then
        err, info = info, nil
      end
      if type(err) == "table" and err.kind == "budget" then
        -- refused before it was sent: the row stays for the next run
        stopped = stopped or "budget"
        s.budget_reason = s.budget_reason or err.message
      else
        s.sent = s.sent + requests_of(info or err)
        record(row, result, info, err)
        s.done = s.done + 1
        if bar then
          bar.cost = s.cost
          bar:tick(err ~= nil)
        elseif next_plain and core.now() >= next_plain then
          io.stderr:write(plain_line(s, total), "\n")
          next_plain = core.now() + (opts.progress_every or 10)
        end
      end
    end
  end
  if total > 0 then
    rt.run(function()
      local workers = {}
      for w = 1, min(opts.concurrency or 8, total) do workers[w] = rt.spawn(worker) end
      for w = 1, #workers do workers[w]:wait() end
    end)
  end
  if bar then bar:finish() end
  if not stopped and core.trapped() then stopped = "interrupted" end
  if ledger then
    local ok, werr = ledger:close()
    if not ok then write_failed(werr) end
  end
  if usage_fh then
    local ok, werr = usage_fh:close()
    if not ok and usage_ok then
      write_failed(format("cannot write the usage log %s: %s", self.usage_log, tostring(werr)))
    end
  end
  -- rows whose input repeats a row sent by this run: the same request,
  -- the same outcome, counted as theirs
  local first = {}
  for _, row in ipairs(todo) do first[row] = true end
  for _, row in ipairs(self.rows) do
    if not row.bad and not first[row] and ran[row.key] then
      local rec = self.ledger_done[row.key]
      if rec.status == "ok" then
        s.succeeded = s.succeeded + 1
      else
        s.failed = s.failed + 1
        s.failed_by_kind[rec.error_kind or "error"] = (s.failed_by_kind[rec.error_kind or "error"] or 0) + 1
      end
    end
  end
  -- rows not finished now and not before
  for _, row in ipairs(self.rows) do
    if not row.bad and not self.ledger_done[row.key] then s.not_attempted = s.not_attempted + 1 end
  end
  s.stopped = stopped
  s.seconds = core.now() - s.t0
  s.t0, s.done = nil, nil
  local wrote, written = pcall(M.write_output, self)
  if not wrote then
    -- the ledger has every finished row: a rerun writes the output
    s.output_error = tostring(written)
    if self.output then os.remove(self.output .. ".tmp") end
  else
    s.written = written
    -- complete only when a rerun has nothing to send: no row failed for a
    -- reason outside the row (those are sent again, see the header)
    local again = false
    for _, row in ipairs(self.rows) do
      local rec = not row.bad and self.ledger_done[row.key]
      if rec and rec.status ~= "ok" and not M.FINAL[rec.error_kind] then again = true break end
    end
    if self.stamp and self.ledger_path and not stopped and not again then self:mark_complete(s) end
  end
  -- rows done before that failed count as failed now too
  for _, row in ipairs(self.rows) do
    local rec = not row.bad and seen[row.key] == nil and self.ledger_done[row.key]
    if rec and rec.status ~= "ok" then
      s.failed = s.failed + 1
      s.failed_by_kind[rec.error_kind or "error"] = (s.failed_by_kind[rec.error_kind or "error"] or 0) + 1
    end
  end
  local code = M.EXIT.ok
  if stopped == "write_error" then code = M.EXIT.failed
  elseif stopped == "interrupted" then code = M.EXIT.interrupted
  elseif stopped == "budget" then code = M.EXIT.budget
  elseif s.failed > 0 or s.output_error then code = M.EXIT.failed end
  return s, code
end

------------------------------------------------------------------ a finished job

-- After a run that stopped for nothing, the ledger's last record is
--   { "complete": stamp, "output_size": bytes, "rows": n, "failed": n, "failed_by_kind": {...} }
-- (no "key": readers of rows skip it).  job.stamp (the CLI's: a hash of
-- the input files' bytes and of everything the keys depend on, the output
-- path and format, --limit) says which job it was; M.finished finds it at
-- the end of the ledger, so a rerun of a finished job with an unchanged
-- input and output reads neither (the resume costs a hash of the input).

local function file_size(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local n = f:seek("end")
  f:close()
  return n
end

function Job:mark_complete(s)
  local f = io.open(self.ledger_path, "ab")
  if not f then return end
  f:write(json.encode({ complete = self.stamp, output_size = file_size(self.output), rows = s.rows,
    failed = s.failed, failed_by_kind = s.failed_by_kind }), "\n")
  core.fsync(f)
  f:close()
end

--- The complete-record of a finished job whose stamp is `stamp` and whose
-- output is as that run left it, or nil.
function M.finished(ledger_path, stamp, output)
  local f = io.open(ledger_path, "rb")
  if not f then return nil end
  local size = f:seek("end")
  -- nothing there (a device such as /dev/full says 0 and reads without end)
  if not size or size == 0 then f:close() return nil end
  f:seek("set", size > 65536 and size - 65536 or 0)
  local tail = f:read("a") or ""
  f:close()
  if tail:sub(-1) ~= "\n" then return nil end
  local from = tail:sub(1, -2):match(".*\n()") or 1 -- the start of the last line (greedy: one pass)
  local last = tail:sub(from, -2)
  if not last:find('"complete"', 1, true) then return nil end
  local ok, rec = pcall(json.decode, last)
  if not ok or type(rec) ~= "table" or rec.complete ~= stamp or rec.key ~= nil then return nil end
  if not output or file_size(output) ~= rec.output_size then return nil end
  return rec
end

--- The summary of a rerun of a finished job (M.finished's record): ->
-- summary, exit code.
function M.finished_summary(task, rec)
  local kinds = type(rec.failed_by_kind) == "table" and rec.failed_by_kind or {}
  local failed = tonumber(rec.failed) or 0
  local rows = tonumber(rec.rows) or 0
  local bad = 0
  local s = { task = task, rows = rows, done_before = 0, sent = 0, succeeded = 0, failed = failed,
    failed_by_kind = kinds, not_attempted = 0, tokens = 0, prompt_tokens = 0, completion_tokens = 0, cost = 0, unpriced = 0,
    seconds = 0, finished_before = true }
  for k, n in pairs(kinds) do if k == "parse" or k == "ragged" or k == "missing_column" then bad = bad + n end end
  s.done_before = rows - bad
  return s, failed > 0 and M.EXIT.failed or M.EXIT.ok
end

--- The summary as text lines (for stderr).
function M.summary_text(s)
  local kinds = {}
  for k, n in pairs(s.failed_by_kind) do kinds[#kinds + 1] = format("%s %d", k, n) end
  table.sort(kinds)
  local lines = {
    format("slm %s: %d rows: %d succeeded, %d failed%s%s%s", s.task, s.rows, s.succeeded, s.failed,
      #kinds > 0 and " (" .. concat(kinds, ", ") .. ")" or "",
      s.done_before > 0 and format(", %d done before", s.done_before) or "",
      s.not_attempted > 0 and format(", %d not attempted", s.not_attempted) or ""),
    format("slm %s: %d requests, %d tokens (%d prompt + %d completion), $%.6f%s, %.2f s", s.task, s.sent, s.tokens,
      s.prompt_tokens, s.completion_tokens, s.cost, (s.unpriced or 0) > 0 and format(" + the unknown cost of %d "
        .. "row(s) of a model with no price (add its prices to slm.models)", s.unpriced) or "", s.seconds),
  }
  if s.output_error and not s.write_error then
    lines[#lines + 1] = format("slm %s: cannot write the output (%s); the ledger has every finished row: rerun to write it",
      s.task, s.output_error)
  elseif s.output_error then
    lines[#lines + 1] = format("slm %s: cannot write the output either (%s)", s.task, s.output_error)
  end
  if s.stopped == "write_error" then
    lines[#lines + 1] = format("slm %s: stopped: %s; the rows recorded before are kept, a row the ledger lacks is "
      .. "sent again by a rerun (%d rows not attempted)", s.task, s.write_error, s.not_attempted)
  elseif s.stopped == "budget" and s.budget_reason and s.budget_reason:find("has no price", 1, true) then
    lines[#lines + 1] = format("slm %s: stopped: %s; the %d rows left stay for a rerun", s.task, s.budget_reason,
      s.not_attempted)
  elseif s.stopped == "budget" then
    lines[#lines + 1] = format("slm %s: stopped: the budget is spent; rerun with a larger --budget to do the %d rows left",
      s.task, s.not_attempted)
  elseif s.stopped == "interrupted" then
    lines[#lines + 1] = format("slm %s: interrupted; rerun the same command to do the %d rows left", s.task,
      s.not_attempted)
  end
  return lines
end

return M
