-- The lua-slm side of tests/ngx_transport_spec.lua: handlers that run
-- inside an app nginx (tests/upstream/app.conf.in), each answering JSON the
-- spec compares with what the libcurl path gives.
local slm = require "slm"
local cjson = require "cjson.safe"
local core = require "slm.core"

local M = {}

M.notes = {} -- what earlier phases (init, init_worker, timers) recorded

local clients = {}

-- One client per worker and option set, as an application keeps one.
function M.client(name, opts)
  local c = clients[name]
  if not c then
    local o = { base_url = M.sim_url, api_key = "sk-test-good", model = "gpt-4o-mini", timeout = 10,
      max_retries = 0 }
    for k, v in pairs(opts or {}) do o[k] = v end
    c = slm.client(o)
    clients[name] = c
  end
  return c
end

-- The fields of a Response or Error that both transports must agree on.
function M.fields(res, err)
  if not res then
    return { error = { kind = err.kind, status = err.status, message = tostring(err.message),
      attempts = err.attempts, partial_text = err.partial and err.partial.text or nil } }
  end
  local tcs
  if res.tool_calls then
    tcs = {}
    for i, tc in ipairs(res.tool_calls) do
      tcs[i] = { id = tc.id, name = tc["function"].name, arguments = tc["function"].arguments }
    end
  end
  return { text = res.text, usage = res.usage, cost = res.cost, finish_reason = res.finish_reason,
    request_id = res.request_id, tool_calls = tcs, model = res.model, id = res.id,
    attempts = res.attempts, refusal = res.refusal }
end

local function reply(t)
  ngx.header["Content-Type"] = "application/json"
  ngx.say(cjson.encode(t))
end
M.reply = reply

-- The request of a query { prompt, scenario, stream, tools, timeout }
-- (the spec makes the same one for the libcurl path).
function M.request(q)
  local req = { messages = { { role = "user", content = q.prompt or "hello" } } }
  if q.scenario then req.headers = { ["X-Sim-Scenario"] = q.scenario } end
  if q.stream then req.stream = true end
  if q.tools then
    req.tools = { { type = "function", ["function"] = { name = "get_weather", parameters = { type = "object",
      properties = { city = { type = "string" } } } } } }
  end
  if q.timeout then req.timeout = tonumber(q.timeout) end
  return req
end

-- Client options a query may set (stall_timeout, max_body, http_version),
-- and the name of the client that has them.
function M.client_options(q)
  local o, name = {}, ""
  for _, k in ipairs{ "stall_timeout", "max_body", "http_version" } do
    if q[k] then
      o[k] = k == "http_version" and q[k] or tonumber(q[k])
      name = name .. k .. "=" .. q[k] .. ";"
    end
  end
  return o, name
end

-- GET /chat?prompt=..&scenario=..&stream=1&client=name: one call.
function M.chat(opts)
  local args = ngx.req.get_uri_args()
  local qopts, qname = M.client_options(args)
  if qname ~= "" then opts = qopts end
  local res, err = M.client(args.client or (qname ~= "" and qname) or "default", opts):chat(M.request(args))
  reply(M.fields(res, err))
end

-- GET /many?n=100&scenario=delay=...: n calls at once through slm.map.
function M.many()
  local args = ngx.req.get_uri_args()
  local n = tonumber(args.n) or 100
  local c = M.client("many", { max_concurrency = n })
  local items = {}
  for i = 1, n do items[i] = i end
  local t0 = core.now()
  local results, errs, nfailed = slm.map(items, function(i)
    return c:chat{ messages = { { role = "user", content = "many " .. i } },
      headers = { ["X-Sim-Scenario"] = args.scenario or "delay=500" } }
  end, { concurrency = n })
  local texts = {}
  for i = 1, n do texts[i] = results[i] and results[i].text or false end
  local first
  for i = 1, n do if errs[i] then first = tostring(errs[i]); break end end
  reply{ ok = n - nfailed, failed = nfailed, texts = texts, first_error = first, seconds = core.now() - t0 }
end

-- GET /fresh: two kept-alive connections to a server that drops every
-- request on a reused one; then one call, with one retry.
function M.fresh()
  local c = M.client("fresh", { base_url = M.sim_url:gsub("/v1$", "/reset-reused/v1"), max_retries = 1 })
  slm.map({ 1, 2 }, function(i)
    return c:chat{ messages = { { role = "user", content = "warm " .. i } },
      headers = { ["X-Sim-Scenario"] = "delay=200" } }
  end, { concurrency = 2 })
  local res, err = c:chat{ messages = { { role = "user", content = "on a fresh one" } } }
  reply(M.fields(res, err))
end

-- GET /cancel: a stream read in one light thread, closed from another.
function M.cancel()
  local c = M.client("default")
  local s = c:stream{ messages = { { role = "user", content = "cancel me" } },
    headers = { ["X-Sim-Scenario"] = "stall=5000" } }
  local got = {}
  local reader = slm.spawn(function()
    for text in s do got[#got + 1] = text end
    return s:result()
  end)
  local closer = slm.spawn(function()
    -- wait until the reader is blocked in the stall, then close
    while #got < 3 do ngx.sleep(0.01) end
    ngx.sleep(0.1)
    s:close()
  end)
  local t0 = core.now()
  local ok, res, err = reader:join()
  closer:wait()
  reply{ ok = ok, kind = err and err.kind, partial = err and err.partial and err.partial.text,
    text = res and res.text, seconds = core.now() - t0, deltas = #got }
end

-- GET /cancel_other: a stream opened (its first deltas read) by the request's
-- own thread, read on in a light thread and closed from a third one while
-- the opener waits for the reader.
function M.cancel_other()
  local c = M.client("default")
  local s = c:stream{ messages = { { role = "user", content = "cancel me elsewhere" } },
    headers = { ["X-Sim-Scenario"] = "stall=5000" } }
  local got = {}
  for _ = 1, 2 do got[#got + 1] = s:next() end
  local reader = slm.spawn(function()
    for text in s do got[#got + 1] = text end
    return s:result()
  end)
  local closer = slm.spawn(function()
    while #got < 3 do ngx.sleep(0.01) end
    ngx.sleep(0.1) -- the reader is blocked in the stall
    s:close()
  end)
  local t0 = core.now()
  local ok, res, err = reader:join()
  closer:wait()
  reply{ ok = ok, kind = err and err.kind, text = res and res.text, seconds = core.now() - t0, deltas = #got }
end

-- A streamed reply of some megabytes (40,000 chunks), straight from the
-- runtime: the conn.
local function big_stream(timeout)
  return require("slm.transport.ngx").open{ url = M.sim_url .. "/chat/completions", method = "POST",
    headers = { "Content-Type: application/json", "Authorization: Bearer sk-test-good",
      "X-Sim-Scenario: chunks=40000" },
    body = cjson.encode{ model = "gpt-4o-mini", stream = true, messages = { { role = "user", content = "x" } } },
    connect_timeout = 5, timeout = timeout, max_body = 1e9 }
end

-- GET /backpressure: a streamed reply of some megabytes read by a slow
-- consumer straight from the runtime: how much the exchange had read ahead
-- of it meanwhile, then the rest read in full.
function M.backpressure()
  local conn = big_stream(30)
  local status = conn:response()
  local taken = #(conn:read() or "")
  local ahead = {}
  for i = 1, 3 do
    ngx.sleep(0.2) -- a slow consumer
    ahead[i] = conn.parser.received - taken
    taken = taken + #(conn:read() or "")
  end
  while true do
    local b = conn:read()
    if not b then break end
    taken = taken + #b
  end
  local ok, kind, msg = conn:result()
  reply{ status = status, ahead = ahead, total = taken, received = conn.parser.received, ok = ok, kind = kind,
    message = msg }
end

-- GET /abandoned: a streamed reply of some megabytes that nobody reads
-- after its headers (nor cancels): the exchange waits for its consumer only
-- until the call's deadline (timeout = 1), then ends as timed out.
function M.abandoned()
  local t0 = ngx.now()
  local conn = big_stream(1)
  local status = conn:response()
  while not conn.ended and ngx.now() - t0 < 10 do ngx.sleep(0.05) end
  local ok, kind, msg = conn:result()
  conn:cancel()
  ngx.update_time()
  reply{ status = status, ok = ok, kind = kind, message = msg, seconds = ngx.now() - t0 }
end

-- GET /left_open: a stream left open without close() on a client with
-- max_concurrency = 1 keeps the slot; the next call times out within its
-- timeout (it used to wait for ever), and gets the slot once it is closed.
function M.left_open()
  local c = slm.client{ base_url = M.sim_url, api_key = "sk-test-good", model = "gpt-4o-mini", timeout = 1,
    max_retries = 0, max_concurrency = 1 }
  local s = c:stream{ messages = { { role = "user", content = "left open" } } }
  local first = s:next()
  local t0 = ngx.now()
  local res, err = c:chat{ messages = { { role = "user", content = "waits" } } }
  ngx.update_time()
  local waited = ngx.now() - t0
  s:close()
  local again = c:chat{ messages = { { role = "user", content = "after close" } } }
  reply{ first = first, sent = res ~= nil, kind = err and err.kind, message = err and err.message,
    seconds = waited, again = again and again.text }
end

-- GET /core: whether this worker ever initialised libcurl, after counting
-- tokens and making cosocket calls; the tokenizer's memory.
function M.core_state()
  local tok = slm.tokenizer("gpt-4o-mini")
  local n = tok:count("How many tokens is this sentence?")
  reply{ http_initialized = core.http_initialized(), tokens = n, memory = tok:memory(),
    preloaded = M.preloaded ~= nil and M.preloaded == tok,
    pid = ngx.worker.pid(), tokenizer_id = tostring(tok._bpe), runtime = M.client("default").runtime.name,
    notes = M.notes }
end

-- Call client:chat here and record the error (phases without cosockets).
function M.try(where)
  local ok, err = pcall(function()
    return M.client("default"):chat{ messages = { { role = "user", content = "from " .. where } } }
  end)
  M.notes[where] = ok and "no error" or tostring(err)
  return ok, err
end

return M
