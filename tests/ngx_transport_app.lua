-- The lua-slm side of tests/ngx_transport_spec.lua: handlers that run
-- inside an app nginx (tests/upstream/app.conf.in), each answering JSON the
-- spec compares with what the libcurl path gives.
local slm = require "slm"
local cjson = require "cjson.safe"
local core = require "slm.core"
local format = string.format

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

------------------------------------------------------------------ hostile upstreams
-- (tests/ngx_hostile_spec.lua) The app nginx answers /raw/<case>/v1/chat/completions
-- itself, on the raw connection (ngx.req.socket(true)), with bytes no sane
-- server sends; /hostile?case=..&timeout=..&stream=1 calls it over cosockets.

local function json_body(text, model)
  return cjson.encode{ id = "chatcmpl-raw", object = "chat.completion", model = model or "gpt-4o-mini",
    choices = { { index = 0, message = { role = "assistant", content = text }, finish_reason = "stop" } },
    usage = { prompt_tokens = 5, completion_tokens = 2, total_tokens = 7 } }
end
M.json_body = json_body

local function ok_head(body, extra)
  return "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" .. (extra or "")
    .. "Content-Length: " .. #body .. "\r\n\r\n"
end

-- each: function(sock, n) with n = the connection's request number (1 on a new one)
local RAW = {}
RAW.big_head = function(sock)
  sock:send("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
  local line = "X-Filler: " .. ("a"):rep(1000) .. "\r\n"
  for _ = 1, 200 do
    if not sock:send(line) then return end
  end
  ngx.sleep(5)
end
RAW.lf_only = function(sock)
  local b = json_body("bare LF")
  sock:send((ok_head(b):gsub("\r\n", "\n")) .. b)
end
RAW.cl_and_chunked = function(sock)
  local b = json_body("chunked wins")
  sock:send("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n"
    .. "Transfer-Encoding: chunked\r\n\r\n" .. format("%x", #b) .. "\r\n" .. b .. "\r\n0\r\n\r\n")
  ngx.sleep(1) -- kept open: a client must not reuse it
end
RAW.chunk_2_64 = function(sock)
  sock:send("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    .. "10000000000000000\r\n{\"id\":")
  ngx.sleep(2)
end
RAW.continue = function(sock)
  local b = json_body("after 100")
  sock:send("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" .. ok_head(b) .. b)
end
RAW.slow_head = function(sock)
  -- one byte per 0.3 s: every read within any idle timeout, never done
  local s = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" .. ("X-Slow: 1\r\n"):rep(100)
  for i = 1, #s do
    if not sock:send(s:sub(i, i)) then return end
    ngx.sleep(0.3)
  end
end
RAW.slow_body = function(sock)
  local b = json_body(("slow "):rep(40))
  sock:send(ok_head(b))
  for i = 1, #b do
    if not sock:send(b:sub(i, i)) then return end
    ngx.sleep(0.3)
  end
end
RAW.slow_sse = function(sock)
  sock:send("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
  local ev = 'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[{"index":0,'
    .. '"delta":{"content":"x"},"finish_reason":null}]}\n\n'
  for _ = 1, 100 do
    for i = 1, #ev, 20 do
      local piece = ev:sub(i, i + 19)
      if not sock:send(format("%x\r\n%s\r\n", #piece, piece)) then return end
      ngx.sleep(0.1)
    end
  end
end
-- a full reply, then (once it was read) another one nobody asked for, on a
-- connection kept open: a pooled connection would hand it to the next call
RAW.late_extra = function(sock, n)
  local b = json_body(n == 1 and "first" or "INJECTED " .. n)
  sock:send(ok_head(b) .. b)
  if n == 1 then
    ngx.sleep(0.1)
    local x = json_body("INJECTED")
    sock:send(ok_head(x) .. x)
  end
end
RAW.conn_close = function(sock)
  local b = json_body("closing")
  sock:send(ok_head(b, "Connection: close\r\n") .. b)
  ngx.sleep(0.5) -- said close, kept open anyway
end
RAW.hostile_model = function(sock)
  local b = json_body("labels", 'evil"model\n# TYPE x counter\nx{a="1"} 1\\')
  sock:send(ok_head(b) .. b)
end

-- an event stream whose deltas are not valid UTF-8 each: a character (the
-- euro sign) split between two deltas, a stray byte, and (model=bad) a
-- model name with a stray byte
local function sse_chunk(content, model)
  return "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"" .. (model or "gpt-4o-mini")
    .. "\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"" .. content .. "\"},\"finish_reason\":null}]}\n\n"
end
RAW.split_utf8 = function(sock)
  local body = sse_chunk("price: 5 \226\130") .. sse_chunk("\172, ok ") .. sse_chunk("stray \255 byte")
    .. sse_chunk(" end \240\159") .. "data: [DONE]\n\n"
  sock:send("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: " .. #body .. "\r\n\r\n" .. body)
end
RAW.bad_model_sse = function(sock)
  local body = sse_chunk("hello", "model-\255") .. "data: [DONE]\n\n"
  sock:send("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: " .. #body .. "\r\n\r\n" .. body)
end
RAW.bad_error = function(sock)
  local body = '{"error":{"message":"upstream broke \255\254 here","type":"server_error"}}'
  sock:send("HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: " .. #body
    .. "\r\n\r\n" .. body)
end

-- the request's bytes on a raw connection (a simple HTTP/1.1 reader: head, Content-Length body)
local function read_request(sock)
  local head = {}
  while true do
    local line, err = sock:receive("*l")
    if not line then return nil, err end
    if line == "" then break end
    head[#head + 1] = line
  end
  local len = 0
  for _, h in ipairs(head) do
    local v = h:match("^[Cc]ontent%-[Ll]ength:%s*(%d+)")
    if v then len = tonumber(v) end
  end
  if len > 0 then return sock:receive(len) end
  return ""
end

function M.raw()
  local case = ngx.var.raw_case
  local fn = RAW[case]
  local dict = ngx.shared.slm_test_notes
  -- the request nginx read (the first of the connection), then more
  -- requests on the same connection, each answered the same way
  ngx.req.read_body()
  local sock = assert(ngx.req.socket(true))
  local n = 1
  local conn = ngx.var.connection
  dict:incr("raw:" .. case .. ":requests", 1, 0)
  dict:set("raw:" .. case .. ":conn:" .. dict:get("raw:" .. case .. ":requests"), conn)
  while true do
    fn(sock, n)
    if case ~= "late_extra" then break end
    sock:settimeout(1000)
    local body = read_request(sock)
    if not body then break end
    n = n + 1
    dict:incr("raw:" .. case .. ":requests", 1, 0)
  end
  ngx.exit(444)
end

-- GET /hostile?case=..&stream=1&timeout=..&stall=..&calls=n: n calls, one after the other
function M.hostile()
  local args = ngx.req.get_uri_args()
  local base = "http://127.0.0.1:" .. ngx.var.server_port .. "/raw/" .. args.case .. "/v1"
  local c = slm.client{ base_url = base, api_key = "sk-test-good", model = "gpt-4o-mini", max_retries = 0,
    timeout = tonumber(args.timeout) or 5, stall_timeout = tonumber(args.stall) or 30,
    observe = args.metrics and slm.ngx.metrics.get{ dict = "slm_test_metrics", vars = false }:observer() or nil }
  local out = { calls = {} }
  for i = 1, tonumber(args.calls) or 1 do
    local t0 = ngx.now()
    if i > 1 and args.gap then ngx.sleep(tonumber(args.gap)) end
    local res, err = c:chat{ messages = { { role = "user", content = "hostile " .. args.case } },
      stream = args.stream == "1" or nil, model = args.model, consumer = args.consumer }
    ngx.update_time()
    local f = M.fields(res, err)
    f.seconds = ngx.now() - t0
    out.calls[i] = f
  end
  if args.gap then ngx.sleep(tonumber(args.gap)) end
  local dict = ngx.shared.slm_test_notes
  out.requests = dict:get("raw:" .. args.case .. ":requests")
  reply(out)
end

------------------------------------------------------------------ relays that end the request
-- (tests/ngx_hostile_spec.lua) One client with max_concurrency = 1 and a
-- budget: a relay whose request is ended under it must give both back.
local exit_client, exit_budget
local function relay_client()
  if not exit_client then
    exit_budget = slm.budget{ usd = 100 }
    exit_client = slm.client{ base_url = M.sim_url, api_key = "sk-test-good", model = "gpt-4o-mini",
      timeout = 2, max_retries = 0, max_concurrency = 1, budget = exit_budget }
  end
  return exit_client
end

-- GET /relay_exit?how=on_delta|push|spawned: ngx.exit(200) at the second piece, from on_delta
-- (stream), from a push source's on_delta, or a call in flight in a light thread
function M.relay_exit()
  local how = ngx.var.arg_how or "on_delta"
  local c = relay_client()
  local req = { messages = { { role = "user", content = "exit mid-stream" } },
    headers = { ["X-Sim-Scenario"] = "chunks=200,slow_chunks=20" } }
  local n = 0
  local function on_delta()
    n = n + 1
    if n == 2 then ngx.exit(ngx.HTTP_OK) end
  end
  if how == "push" then
    req.stream = true
    slm.ngx.relay(function(emit)
      req.on_delta = function(text, chunk)
        emit(text, chunk)
        on_delta()
      end
      return c:chat(req)
    end)
  else
    slm.ngx.relay(c:stream(req), { on_delta = on_delta })
  end
end

-- GET /relay_raw?case=..&cut=n: slm.ngx.relay of a stream from the raw upstream (cut: on_delta
-- returns the first n bytes of each piece, which may end inside a character)
function M.relay_raw()
  local base = "http://127.0.0.1:" .. ngx.var.server_port .. "/raw/" .. ngx.var.arg_case .. "/v1"
  local c = slm.client{ base_url = base, api_key = "sk-test-good", model = "gpt-4o-mini", max_retries = 0,
    timeout = 5 }
  local cut = tonumber(ngx.var.arg_cut)
  local ok, err = pcall(slm.ngx.relay, c:stream{ messages = { { role = "user", content = "raw relay" } } },
    { on_delta = cut and function(text) return text:sub(1, cut) end or nil })
  if not ok then ngx.print(slm.ngx.event("raised", { error = tostring(err) })) end
end

-- GET /relay_state: the budget's hold, and whether the client's one slot is free (a call within 1 s)
function M.relay_state()
  local c = relay_client()
  local _, held = exit_budget:reserved()
  local res, err = c:chat{ messages = { { role = "user", content = "the slot" } }, timeout = 1 }
  local _, spent = exit_budget:spent()
  reply{ reserved_tokens = held, spent_tokens = spent, text = res and res.text, kind = err and err.kind }
end

return M
