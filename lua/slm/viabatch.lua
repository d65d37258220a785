-- slm.viabatch: the batch runner's rows (slm.jobs) through the provider's
-- Batch API (slm.batchapi): `slm classify|extract|generate|summarize|batch
-- --via batch`, and `slm batch status|resume|cancel ID`.
--
-- The task layer stays as it is: each pending row's task runs once against
-- a stand-in client that keeps the first request the task makes (instead of
-- sending it); those requests go out as batches, custom_id = the row key.
-- When the batches are collected, each row's task runs again against a
-- stand-in that answers that same request (the same body, whatever the
-- order of the task's calls) with the row's batch result, so the task reads, validates and prices it as it would a direct reply, and the
-- runner writes the same result rows, ledger records and usage-log lines
-- (marked via = "batch").  A follow-up the task makes (a repair re-ask, a
-- second chunk) goes to the real client directly.
--
-- Two ledgers, each with one job: the runner's (OUT.ledger: which rows are
-- finished, as for a direct run) and the Batch API's (the directory
-- OUT.batch: batches, files, collected lines; slm.batchapi).  A row is
-- only submitted while the runner's ledger does not hold it as finished,
-- and slm.batchapi never sends a row that has a result.  The job's ID
-- (slm.batchapi's job id) is registered under the state directory with the
-- command line that made it, so `slm batch resume ID` runs it again from
-- any process.
local batchapi = require "slm.batchapi"
local core = require "slm.core"
local errors = require "slm.errors"
local options = require "slm.options"
local json = require "slm.json"

local type, ipairs, pcall, tostring, format = type, ipairs, pcall, tostring, string.format

local M = {}

------------------------------------------------------------------ the registry

local function shq(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

--- Where `slm` keeps what outlives a process: SLM_STATE_DIR, else
-- $XDG_STATE_HOME/slm, else ~/.local/state/slm.
function M.state_dir()
  local d = os.getenv("SLM_STATE_DIR")
  if d and d ~= "" then return d end
  d = os.getenv("XDG_STATE_HOME")
  if d and d ~= "" then return d .. "/slm" end
  return (os.getenv("HOME") or ".") .. "/.local/state/slm"
end

local function registry_path(id)
  if not id:match("^[%w_%-]+$") then return nil end
  return M.state_dir() .. "/batches/" .. id .. ".json"
end

--- The absolute form of a path (relative to the working directory).
function M.absolute(path)
  if path:sub(1, 1) == "/" then return path end
  local p = io.popen("pwd -P")
  local cwd = p:read("l")
  p:close()
  return (cwd or ".") .. "/" .. path
end

--- Record a job: id -> { id, dir, argv, cwd, task, output }.
function M.register(entry)
  local path = registry_path(entry.id)
  if not path then return nil, "bad job id" end
  os.execute("mkdir -p " .. shq(M.state_dir() .. "/batches"))
  local f, err = io.open(path .. ".tmp", "wb")
  if not f then return nil, err end
  -- a write that fails (a full disk) never replaces a good record with a
  -- torn one
  local ok, werr = f:write(json.encode(entry))
  local cok, cerr = f:close()
  if not ok or not cok then
    os.remove(path .. ".tmp")
    return nil, tostring(werr or cerr)
  end
  return os.rename(path .. ".tmp", path)
end

--- A registered job: -> entry | nil, message.  `id` may also be the job's
-- batch directory.
function M.lookup(id)
  local path = registry_path(id)
  local f = path and io.open(path, "rb")
  if not f then
    local l = io.open(id .. "/ledger.json", "rb")
    if l then
      -- a batch directory: its job's record when there is one (the task,
      -- the command line), else the directory alone
      local ok, ledger = pcall(json.decode, l:read("a"))
      l:close()
      local jid = ok and type(ledger) == "table" and type(ledger.id) == "string" and ledger.id or nil
      local e = jid and jid ~= id and M.lookup(jid)
      if e and e.dir == M.absolute(id) then return e end
      return { id = jid or id, dir = id }
    end
    return nil, format("no batch job '%s' (looked in %s)", id, M.state_dir() .. "/batches")
  end
  local text = f:read("a")
  f:close()
  local ok, e = pcall(json.decode, text)
  if not ok or type(e) ~= "table" or type(e.dir) ~= "string" then return nil, "the record of " .. id .. " is damaged" end
  return e
end

------------------------------------------------------------------ stand-in clients

-- The chat-completions body of a task's request, as a batch line holds it.
local function body_of(req, client)
  local body = options.request(req, "slm --via batch", 3)
  body.model = body.model or client.model
  body.stream, body.stream_options = nil, nil
  return body
end

-- A client that keeps the first request a task makes and sends nothing.
local function capturing(client, sink)
  return { model = client.model, fallback = {}, chat = function(_, req)
    if not sink.body then
      sink.body = body_of(req, client)
      sink.text = json.encode(sink.body)
    end
    return nil, errors.new("cancelled", "kept for the Batch API", { status = 0 })
  end }
end

-- A client that answers the request that was batched (the same body:
-- not merely the first call, since a task may make its calls in another
-- order) with `result`, a Response or an Error; other calls go to the
-- real client.
local function replaying(client, text, result)
  local used = false
  return { model = client.model, fallback = {}, chat = function(_, req)
    if not used and json.encode(body_of(req, client)) == text then
      used = true
      if errors.is(result) then return nil, result end
      return result
    end
    return client:chat(req)
  end }
end

M.capturing, M.replaying = capturing, replaying -- for tests/batchapi_cli_spec.lua

------------------------------------------------------------------ the run

-- A count as an integer (JSON numbers decode as floats), "?" when absent.
local function n(v)
  if type(v) ~= "number" then return "?" end
  return format("%d", v)
end

local function progress_line(task, b)
  local c = type(b.request_counts) == "table" and b.request_counts or {}
  return format("slm %s: batch %s: %s, %s of %s done, %s failed", task, tostring(b.id), tostring(b.status),
    n(c.completed or 0), n(c.total), n(c.failed or 0))
end

-- An error's text inside a message of ours, without its own "slm: "
-- (the command line puts one in front of the whole).
local function bare(err) return (tostring(err):gsub("^slm: ", "")) end

--- Run `job` (slm.jobs, rows read) with the task adapter `ad` through the
-- Batch API.  o: dir (the batch directory), wait (false: submit and
-- return), poll_interval, max_poll_interval, wait_timeout, max_requests,
-- max_bytes, progress (bool), concurrency, argv, quiet.
-- -> summary, code (as jobs' Job:run) | nil, code, message |
--    "submitted", info (wait = false)
function M.run(job, ad, client, o)
  local t0 = core.now()
  local todo = job:pending()
  local requests, by_key, texts = {}, {}, {}
  for _, row in ipairs(todo) do
    local sink = {}
    pcall(ad.call, row, capturing(client, sink))
    if sink.body then
      local cid = batchapi.custom_id(row.key)
      requests[#requests + 1] = { custom_id = cid, body = sink.body }
      by_key[row.key], texts[cid] = cid, sink.text
    end
  end
  -- a budget: the rows whose worst case (counted prompt + max_tokens, at
  -- the batch price) still fits go; the others stay for a later run (exit
  -- 3), as the direct path leaves the rows a budget refuses
  -- A model with no price cannot be bounded by a USD budget: its rows are
  -- refused as the direct path refuses them (kind budget, exit 3, the rows
  -- left for a later run), never counted as free.
  local refused, nrefused, budget_reason = {}, 0, nil
  local budget = client.budget
  if budget then
    local left = budget:remaining()
    local usd_bound = type(budget.usd) == "number" and budget.usd ~= math.huge
    local guard = require("slm.guard")
    local models = require("slm.models")
    local kept, spent = {}, 0
    for _, r in ipairs(requests) do
      local m = models.find(r.body.model)
      local out = r.body.max_tokens or r.body.max_completion_tokens or (m and m.max_output) or 4096
      -- the prompt's worst case, as the direct path's budget takes it
      -- (audio and file parts: the model's whole context)
      local n, info = guard.prompt_tokens(r.body, r.body.model)
      local worst_in, why = guard.worst_prompt(n, info, r.body.model)
      local worst = worst_in and batchapi.cost(r.body.model, { prompt_tokens = worst_in, completion_tokens = out })
      if not worst_in then
        refused[r.custom_id] = true
        nrefused = nrefused + 1
        budget_reason = budget_reason or why
      elseif worst == nil and usd_bound then
        refused[r.custom_id] = true
        nrefused = nrefused + 1
        budget_reason = budget_reason or format("model %s has no price, so a USD budget cannot bound it "
          .. "(add its prices to slm.models, or use a token budget)", tostring(r.body.model))
      elseif left and spent + (worst or 0) > left then
        refused[r.custom_id] = true
        nrefused = nrefused + 1
      else
        spent = spent + (worst or 0)
        kept[#kept + 1] = r
      end
    end
    requests = kept
  end
  -- The job's ID: what it sends (task, definition, model, parameters: in
  -- the row keys; every request body) and where its ledger is, so that
  -- two jobs never share one (the registry maps an ID to one directory).
  local texts_list = {}
  for i, r in ipairs(requests) do texts_list[i] = r.custom_id .. " " .. texts[r.custom_id] end
  local abs_dir = M.absolute(o.dir)
  local job_id = core.sha256(json.encode({ task = job.task, version = job.version or "", model = job.model or "",
    params = job.params or {}, dir = abs_dir, requests = json.array(texts_list) })):sub(1, 16)
  local ok, bjob = pcall(batchapi.job, { client = client, dir = o.dir, requests = requests, id = job_id,
    poll_interval = o.poll_interval, max_poll_interval = o.max_poll_interval, max_requests = o.max_requests,
    max_bytes = o.max_bytes, metadata = { slm_task = job.task } })
  if not ok then return nil, 2, tostring(bjob) end
  local id = bjob.ledger.id
  if o.argv then
    local rok, rerr = M.register{ id = id, dir = abs_dir, argv = o.argv, cwd = M.absolute("."), task = job.task,
      output = job.output and M.absolute(job.output) }
    if not rok and not o.quiet then
      io.stderr:write(format("slm %s: cannot record job %s in %s (%s): `slm batch resume %s` will not find it; "
        .. "rerun the same command instead\n", job.task, id, M.state_dir() .. "/batches", tostring(rerr), o.dir))
    end
  end
  -- the Batch API part; a signal (SIGINT/SIGTERM, trapped by the caller)
  -- ends the wait: the batches go on at the provider, the ledger keeps
  -- them, and a rerun (or `slm batch resume ID`) collects them
  local interrupted = false
  local function batches()
    -- batches finished since the last run (and one whose creation was cut
    -- off, adopted), then the rows of this run that need a batch: none yet,
    -- or a failure worth sending again
    local _, err = bjob:collect()
    if err then return nil, 1, "collecting: " .. bare(err) end
    local wanted = {}
    for _, r in ipairs(requests) do wanted[r.custom_id] = true end
    local send = {}
    for _, i in ipairs(bjob:unfinished(batchapi.retryable)) do
      if wanted[bjob.ledger.order[i]] then send[#send + 1] = i end
    end
    local made
    made, err = bjob:submit(send)
    if not made then return nil, 1, "submitting: " .. bare(err) .. " (slm batch resume " .. id .. " goes on)" end
    local info = { id = id, rows = #send, batches = #made, dir = o.dir }
    if o.wait == false then return "submitted", info end
    if core.trapped() then interrupted = true return true end
    local seen = {}
    local done
    done, err = bjob:wait{ interval = o.poll_interval, max_interval = o.max_poll_interval, timeout = o.wait_timeout,
      stop = function() return core.trapped() ~= nil end,
      on_progress = function(b)
        local line = progress_line(job.task, b)
        if not o.quiet and seen[b.id] ~= line then io.stderr:write(line, "\n") end
        seen[b.id] = line
      end }
    if not done and type(err) == "table" and err.stopped then interrupted = true return true end
    if not done then return nil, 1, bare(err) .. " (slm batch resume " .. id .. " goes on)" end
    _, err = bjob:collect()
    if err then return nil, 1, "collecting: " .. bare(err) end
    return true
  end
  local bok, r1, r2, r3 = pcall(batches)
  -- a raise here: the ledger could not be written (a full disk)
  if not bok then return nil, 1, tostring(r1) .. " (slm batch resume " .. id .. " goes on)" end
  if r1 ~= true then return r1, r2, r3 end
  -- interrupted: nothing is replayed (the runner stops at once on the
  -- trapped signal): the summary, the output of the rows done before, exit 130
  local results = interrupted and {} or bjob:results()
  job.via = "batch"
  local removed = 0
  if nrefused > 0 then
    -- left out of this run's output, like rows a direct run did not reach
    local keep = {}
    for _, row in ipairs(job.rows) do
      if not (row.key and refused[by_key[row.key]]) then keep[#keep + 1] = row end
    end
    removed = #job.rows - #keep -- rows, not requests: rows with the same input share one
    job.rows = keep
    job.stamp = nil -- not a finished job: a rerun has rows to send
  end
  local summary, code, msg = job:run{ client = client, concurrency = o.concurrency, progress = o.progress,
    progress_every = o.progress_every,
    call = function(row, c)
      local cid = by_key[row.key]
      if not cid then return ad.call(row, c) end -- the task sent nothing: it fails or answers by itself
      local r = results[cid]
      if r == nil then
        return nil, errors.new("cancelled", "no result from the Batch API yet", { status = 0 })
      end
      return ad.call(row, replaying(c, texts[cid], r))
    end }
  -- the whole run's time: the submission and the wait, not only the replay
  if summary then summary.seconds = core.now() - t0 end
  if summary and nrefused > 0 then
    summary.rows, summary.not_attempted = summary.rows + removed, summary.not_attempted + removed
    if summary.stopped ~= "interrupted" and summary.stopped ~= "write_error" then
      summary.stopped, code = "budget", require("slm.jobs").EXIT.budget
      summary.budget_reason = summary.budget_reason or budget_reason
    end
  end
  return summary, code, msg
end

-- A registered job's batchapi job: -> bjob, entry | nil, message
local function open_job(client, id)
  local e, err = M.lookup(id)
  if not e then return nil, err end
  local bjob
  bjob, err = batchapi.open(client, e.dir)
  if not bjob then return nil, tostring(err) end
  return bjob, e
end

--- `slm batch status ID`: -> lines (refreshed from the provider).
function M.status(client, id)
  local bjob, e = open_job(client, id)
  if not bjob then return nil, e end
  local _, perr = bjob:poll()
  local s = bjob:status()
  local kinds = {}
  for _, k in ipairs(s.kinds) do kinds[#kinds + 1] = format("%s %d", k, s.by_kind[k]) end
  local lines = {
    format("batch job %s (%s)%s", s.id, e.dir, e.task and (": slm " .. e.task) or ""),
    format("rows %d: %d succeeded, %d failed%s, %d not collected; $%.6f at the batch price", s.rows, s.succeeded,
      s.failed, #kinds > 0 and (" (" .. table.concat(kinds, ", ") .. ")") or "", s.pending, s.cost),
  }
  for _, b in ipairs(s.batches) do
    local c = type(b.request_counts) == "table" and b.request_counts or {}
    lines[#lines + 1] = format("  %s  %-11s %6d rows  %s/%s done, %s failed%s", tostring(b.id or "(not created)"),
      tostring(b.status), b.rows, n(c.completed or 0), n(c.total or b.rows), n(c.failed or 0),
      b.collected and ", collected" or "")
  end
  if perr then lines[#lines + 1] = "(could not refresh: " .. tostring(perr) .. ")" end
  return lines, s, e
end

--- `slm batch cancel ID`: -> lines | nil, message
function M.cancel(client, id)
  local bjob, err = open_job(client, id)
  if not bjob then return nil, err end
  local ok, cerr = bjob:cancel()
  if not ok then return nil, tostring(cerr) end
  local lines = {}
  for _, b in ipairs(bjob.ledger.batches) do
    lines[#lines + 1] = format("  %s  %s", tostring(b.id or "(not created)"), tostring(b.status))
  end
  return lines
end

--- The shell command that runs a registered job again (`resume`).
function M.resume_command(e, self_path)
  if type(e.argv) ~= "table" then return nil, "the job " .. tostring(e.id) .. " has no command line recorded" end
  local parts = {}
  for _, a in ipairs(e.argv) do
    if a ~= "--no-wait" then parts[#parts + 1] = shq(a) end
  end
  return "cd " .. shq(e.cwd or ".") .. " && " .. shq(self_path) .. " " .. table.concat(parts, " ")
end

return M
