-- slm.pipeline: the attempts of one call, for plain and streamed calls
-- alike: the models to try (the requested one, then its fallbacks), per
-- model the guard (context check, budget reservation), per attempt the rate
-- limits, the concurrency slot and the HTTP exchange, and after a failure
-- the one decision: retry the same model, move to the next one, or fail.
--
--   local call = pipeline.new(client, body, opts, stream)
--   local conn, err = call:open()        -- one attempt on the current model
--   ... read the reply ...
--   return call:succeeded(res)           -- usage checked, cost, budget settled
--   if call:failed(err, delivered) then  -- true: try again (it slept the backoff
--     ... loop ...                       --   or moved to the next model)
--   else return nil, call:error() end    -- the call's error, secrets removed
--
-- Resources are released explicitly on every path (never only by __gc or
-- __close, which LuaJIT lacks): the slot after each attempt, the budget
-- reservation when a model is done (succeeded, failed for good, cancelled,
-- or an error raised through the call: call:abort()).
--
-- Limits come from the client (rpm, tpm, max_concurrency: its own
-- in-process ones, or shared objects of slm.shdict / slm.redis) and, for a
-- request naming its consumer on a client with quotas, from that
-- consumer's quota (slm.quotas): both apply, the client's first.  A
-- deterministic request on a client with a cache is looked up first
-- (call:cached()) and stored when it succeeds (slm.cache).
local json = require "slm.json"
local errors = require "slm.errors"
local models = require "slm.models"
local retry = require "slm.retry"
local redact = require "slm.redact"
local decode = require "slm.decode"
local guard = require "slm.guard"
local cache = require "slm.cache"
local options = require "slm.options"

local type, ipairs, tostring, setmetatable, pcall, error, next =
  type, ipairs, tostring, setmetatable, pcall, error, next
local ceil = math.ceil

local M = {}

local Call = {}
Call.__index = Call

-- client -> its header lists (plain and streamed, with Authorization),
-- built once and kept out of the client table, like the key itself
local header_cache = setmetatable({}, { __mode = "k" })

local function request_headers(client, extra, stream)
  local lists = header_cache[client]
  if not lists then
    local own, key = client:_headers(), client:_secret()
    lists = {}
    for i, accept in ipairs{ "application/json", "text/event-stream" } do
      local l = {}
      for j = 1, #own do l[j] = own[j] end
      l[#l + 1] = "Accept: " .. accept
      if key and key ~= "" then l[#l + 1] = "Authorization: Bearer " .. key end
      lists[i] = l
    end
    header_cache[client] = lists
  end
  local base = lists[stream and 2 or 1]
  if not extra then return base end -- shared, never modified
  local h = {}
  for i = 1, #base do h[i] = base[i] end
  for i = 1, #extra do h[#h + 1] = extra[i] end
  return h
end

-- Fields that are arrays in the API: empty ones are not sent (`tools: {}`
-- would go out as an object, and an empty array is invalid there anyway).
local function drop_empty(body)
  local t = body.tools
  if type(t) == "table" and next(t) == nil then
    body.tools, body.tool_choice, body.parallel_tool_calls = nil, nil, nil
  end
  t = body.stop
  if type(t) == "table" and next(t) == nil then body.stop = nil end
  t = body.functions
  if type(t) == "table" and next(t) == nil then body.functions = nil end
  t = body.modalities
  if type(t) == "table" and next(t) == nil then body.modalities = nil end
end

function M.new(client, body, opts, stream)
  local first = body.model or client.model
  local chain = { first }
  local fb = opts.fallback
  if fb == nil then fb = client.fallback end
  if fb then
    local n = 1
    for i = 1, #fb do
      local m = fb[i]
      if m ~= first then n = n + 1; chain[n] = m end
    end
  end
  drop_empty(body)
  -- within the credentials' scope: two tenants (keys, organizations) never share an entry
  local ckey = client.cache and cache.key(client.base_url_display, first, body, cache.scope(client, opts)) or false
  if stream then
    body.stream = true
    if type(body.stream_options) ~= "table" then body.stream_options = { include_usage = true } end
  end
  local rt = client.runtime
  client.stats.requests = client.stats.requests + 1
  -- the consumer's quota; its key itself is never kept
  local key, quota, display = opts.consumer, false, false
  if key then
    if client.quotas then
      quota = client.quotas:consumer(key)
      display = quota.display
    else
      display = require("slm.quotas").display(key)
    end
    opts.consumer = nil
  end
  -- every field the call will have, so that the table is made at its size
  -- once (false: not yet)
  return setmetatable({
    client = client, rt = rt, body = body, opts = opts, stream = stream, chain = chain,
    mi = 1, attempts = 0, model_attempts = 0, t0 = rt.now(),
    max_retries = opts.max_retries or client.max_retries,
    timeout = opts.timeout or client.timeout,
    bill_usd = 0, bill_tokens = 0, priced = true,
    ready = false, payload = false, slot = false, fresh = false, cancelled = false, errs = false,
    prompt = false, prompt_info = false, resv = false, budget = false, reserved_usd = 0,
    qresv = false, quota = quota, consumer = display, cache_key = ckey, tokens = false,
    no_consumer = client.quotas ~= nil and not key,
    -- what every attempt of the call was billed, and the stream's first
    -- token: for the client's observe hook
    used_prompt = 0, used_completion = 0, used_cost = 0, ttft = false,
    secret_set = false, any_unpriced = false,
  }, Call)
end

function Call:model() return self.chain[self.mi] end

--- The secrets to keep out of this call's errors: the client's, and the
-- values of the request's own secret-looking headers (X-Api-Key, ...).
function Call:secrets()
  local set = self.secret_set
  if set then return set end
  set = self.client:_secrets()
  local h = self.opts.headers
  if h then
    local list = {}
    for k, v in pairs(h) do
      if options.secret_header(k) then options.add_secret_value(list, v) end
    end
    if list[1] then
      for _, v in pairs(self.client:_secret_list()) do list[#list + 1] = v end
      set = redact.set(list)
    end
  end
  self.secret_set = set
  return set
end

-- A shared limit's failure as the attempt's error: the slm error it gave
-- (slm.shdict's, slm.redis'), else kind `kind` with its message.
local function limit_error(self, err, kind, what)
  if not errors.is(err) then err = errors.new(kind, what .. ": " .. tostring(err), { status = 0 }) end
  err.model = err.model or self.chain[self.mi]
  err.no_retry = true
  return nil, err
end

-- Wait for the rate limits (client's, then the consumer's): true | nil, err
local function take(self, lim, n, what)
  local ok, err = lim:take(n, self.rt)
  if ok == false or (ok == nil and err ~= nil) then return limit_error(self, err, "storage", what .. " limiter") end
  return true
end

-- A shared concurrency slot: true | nil, err (the ones taken are kept in
-- self.tokens, given back by release()).
local function slot(self, sem)
  local rt = self.rt
  local t0 = rt.now()
  local tok, err = sem:acquire(rt, self.timeout)
  if not tok then
    return limit_error(self, err, rt.now() - t0 >= self.timeout and "timeout" or "storage", "concurrency slot")
  end
  local t = self.tokens
  if not t then t = {}; self.tokens = t end
  t[#t + 1] = sem
  t[#t + 1] = tok
  return true
end

local function limits(self, client)
  local q = self.quota or nil
  local ok, err = true, nil
  local rpm, qrpm = client.rpm_bucket, q and q.rpm
  if rpm then ok, err = take(self, rpm, 1, "rpm") end
  if ok and qrpm then ok, err = take(self, qrpm, 1, "the consumer's rpm") end
  local tpm, qtpm = client.tpm_bucket, q and q.tpm
  if ok and (tpm or qtpm) then
    local n = (self.prompt or ceil(#self.payload / 4)) + (guard.max_out(self.body) or 0)
    if tpm then ok, err = take(self, tpm, n, "tpm") end
    if ok and qtpm then ok, err = take(self, qtpm, n, "the consumer's tpm") end
  end
  if not ok then return nil, err end
  if client.sem then
    -- within the call's timeout: a slot whose holder never gives it back
    -- (a stream abandoned without close) must not make this wait for ever
    local rt = self.rt
    local t0 = rt.now()
    local got, why = client.sem:acquire(self.timeout)
    if got == nil and why == "timeout" then -- (a runtime's semaphore returning nothing has its slot)
      return limit_error(self, string.format("none free within %.3g s (max_concurrency = %d; a stream left "
        .. "open without close() keeps its slot)", rt.now() - t0, client.max_concurrency), "timeout",
        "concurrency slot")
    end
    self.slot = true
  end
  if client.shared_sem then ok, err = slot(self, client.shared_sem) end
  if ok and q and q.sem then ok, err = slot(self, q.sem) end
  if not ok then
    self:release()
    return nil, err
  end
  return true
end

local function cancelled_error(model)
  return errors.new("cancelled", "cancelled by the caller", { status = 0, model = model })
end

--- Start one attempt on the current model: -> conn | nil, err (nothing was
-- sent; give err to failed()).  May wait: rate limits, the slot, nothing else.
function Call:open()
  local client, model = self.client, self.chain[self.mi]
  if self.cancelled then return nil, cancelled_error(model) end
  if not self.ready then
    if self.no_consumer then
      return nil, errors.new("auth", "this client has per-consumer quotas: the request must name its "
        .. "consumer", { status = 0, model = model, no_retry = true })
    end
    if client.key_missing then
      return nil, errors.new("auth", "no API key for " .. client.base_url_display .. ": set SLM_API_KEY or "
        .. "OPENAI_API_KEY (or pass api_key to slm.client); for a local server set SLM_BASE_URL",
        { status = 0, model = model })
    end
    local body = self.body
    body.model = model
    -- a body JSON cannot carry (text that is not UTF-8, a function, NaN):
    -- the request cannot be sent, whatever the model
    local jok, payload = pcall(json.encode, body)
    if not jok then
      return nil, errors.new("invalid_request", "the request cannot be sent as JSON: "
        .. tostring(payload):gsub("^slm%.json: ", ""), { status = 0, model = model })
    end
    local gok, ok, err = pcall(guard.open, self, client, body, self.opts, model, #payload)
    if not gok then -- a budget object that raised: what was reserved goes back
      self:abort()
      error(ok, 0)
    end
    if not ok then return nil, err end
    self.ready = true
    self.payload = payload
    -- a budget's reserve may wait (a shared one): a close() meanwhile found
    -- nothing held yet, so the hold made since goes back here
    if self.cancelled then
      self:abort()
      return nil, cancelled_error(model)
    end
  end
  self.attempts = self.attempts + 1
  self.model_attempts = self.model_attempts + 1
  client.stats.attempts = client.stats.attempts + 1
  -- a limiter or semaphore object that raises (a user's own, a shared one)
  -- must not keep the budget's hold or a slot taken before it
  local pok, lok, lerr = pcall(limits, self, client)
  if not pok then
    self:abort()
    error(lok, 0)
  end
  if not lok then return nil, lerr end
  if self.cancelled then
    -- (closed while waiting for a limit or a slot: the budget's hold too)
    self:abort()
    return nil, cancelled_error(model)
  end
  local stream = self.stream
  local ok, conn = pcall(self.rt.open, {
    url = client:_url(),
    method = "POST",
    headers = request_headers(client, self.opts.header_list, stream),
    body = self.payload,
    connect_timeout = client.connect_timeout,
    timeout = (not stream) and self.timeout or nil,
    first_byte_timeout = stream and self.timeout or nil,
    idle_timeout = stream and client.stall_timeout or nil,
    max_body = client.max_body,
    ca_file = client.ca_file,
    http_version = client.http_version,
    fresh_connect = self.fresh or nil,
  })
  if not ok then
    self:abort()
    error(conn, 0)
  end
  return conn
end

--- Give the concurrency slots back (after each attempt; idempotent).
function Call:release()
  if self.slot then
    self.slot = false
    self.client.sem:release()
  end
  local t = self.tokens
  if t then
    self.tokens = false
    for i = 1, #t, 2 do t[i]:release(t[i + 1]) end
  end
end

-- Add what the provider billed for one attempt to this model's bill and
-- the client's stats.
function Call:bill(usage, cost)
  local st = self.client.stats
  st.prompt_tokens = st.prompt_tokens + usage.prompt_tokens
  st.completion_tokens = st.completion_tokens + usage.completion_tokens
  self.used_prompt = self.used_prompt + usage.prompt_tokens
  self.used_completion = self.used_completion + usage.completion_tokens
  if cost then
    self.used_cost = self.used_cost + cost
    st.cost = st.cost + cost
    self.bill_usd = self.bill_usd + cost
  else
    st.unpriced = st.unpriced + 1
    self.priced = false
    self.any_unpriced = true
  end
  self.bill_tokens = self.bill_tokens + usage.total_tokens
end

--- What the whole call was billed, every attempt and model included
-- (replies that could not be used, a fallback's failed models): the
-- tokens and cost its budget and the client's stats were charged.  cost
-- is nil when some attempt's price is unknown.
function Call:billed()
  local p, c = self.used_prompt, self.used_completion
  return { prompt_tokens = p, completion_tokens = c, total_tokens = p + c,
    cost = (not self.any_unpriced) and self.used_cost or nil }
end

-- This model is done: its reservation becomes what it was billed.
function Call:settle()
  if self.resv or self.qresv then guard.settle(self, self.priced and self.bill_usd or nil, self.bill_tokens) end
  self.bill_usd, self.bill_tokens, self.priced = 0, 0, true
end

--- An error is being raised through the call: release everything it holds.
function Call:abort()
  self:release()
  self:settle()
  self.ready = nil
end

--- USD of a usage for the model that answered (when the price table knows
-- it: dated snapshots map to their alias), else the requested model, else
-- the provider's own figure; nil when none is known.
function M.price(answered, requested, usage)
  return models.cost(answered, usage) or models.cost(requested, usage) or usage.cost
end

-- The usage a Response reports: the provider's, checked (decode.usage);
-- counted by us where it is missing or not to be trusted (flagged).
function Call:usage_of(res)
  local model = self.chain[self.mi]
  local info = models.find(model)
  local body = self.body
  local cap = guard.max_out(body)
  local usage, problem = decode.usage(res.raw_usage, info and info.context, cap and cap * (body.n or 1))
  if usage and not problem then return usage end
  usage = usage or {}
  if not usage.prompt_tokens then usage.prompt_tokens = guard.prompt_tokens_of(self, self.body, model) end
  if not usage.completion_tokens then usage.completion_tokens = guard.completion_tokens(res, model) end
  usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
  usage.estimated = true
  res.usage_problem = problem and ("the provider's usage was not used (" .. problem .. "): counted instead")
    or "the reply carried no usage: counted"
  return usage
end

-- Usage, cost, attempts and timings of a Response of the current model.
function Call:finish(res)
  local model = self.chain[self.mi]
  local usage = self:usage_of(res)
  res.usage = usage
  res.cost = M.price(res.model, model, usage)
  res.provider_cost = usage.cost
  res.attempts = self.attempts
  res.latency = self.rt.now() - self.t0
  res.requested_model = self.chain[1]
  local h = res.headers
  if h then res.request_id = h["x-request-id"] else res.headers, res.request_id = nil, nil end
  return res
end

-- The client's observe hook, once per finished call (succeeded or failed
-- for good): what it was for, what it did and cost.  The hook runs under
-- pcall: a broken observer is logged, never the call's failure.
local observer_warned = false
local function observe(call, res, err)
  local fn = call.client.observe
  if not fn then return end
  local ok, why = pcall(fn, {
    model = call.chain[call.mi], requested_model = call.chain[1],
    answered_model = res and res.model or nil,
    consumer = call.consumer or nil, -- the display form: a key is never passed on
    outcome = res and "ok" or "error", kind = err and err.kind or nil, status = err and err.status or nil,
    prompt_tokens = call.used_prompt, completion_tokens = call.used_completion,
    cost = call.used_cost,
    latency = call.rt.now() - call.t0, ttft = call.ttft or nil,
    attempts = call.attempts, stream = call.stream and true or false,
    finish_reason = res and res.finish_reason or nil,
    cached = res and res.cached or nil,
  })
  if not ok and not observer_warned then
    observer_warned = true
    local msg = "slm: the client's observe hook failed (reported once): " .. tostring(why)
    if ngx and ngx.log then ngx.log(ngx.ERR, msg) else io.stderr:write(msg, "\n") end
  end
end

--- The cached Response of this call (a deterministic request on a client
-- with a cache), or nil: then it must be sent.  A hit is observed too
-- (`cached = true`, nothing billed, no attempt).
function Call:cached()
  local key = self.cache_key
  if not key or self.no_consumer then return nil end -- (refused in open())
  local res = cache.get(self.client, key)
  if not res then return nil end
  res.attempts = 0
  res.billed = { prompt_tokens = 0, completion_tokens = 0, total_tokens = 0, cost = 0 }
  res.latency = self.rt.now() - self.t0
  res.requested_model = self.chain[1]
  if self.consumer then res.consumer = self.consumer end
  observe(self, res, nil)
  return res
end

--- The current model answered: -> res (finished, billed, settled).
function Call:succeeded(res)
  self:release()
  self:finish(res)
  self:bill(res.usage, res.cost)
  self:settle()
  if self.mi > 1 then res.fallback_errors = redact.deep(self.errs, self:secrets()) end
  res.billed = self:billed()
  if self.consumer then res.consumer = self.consumer end
  if self.cache_key then cache.put(self.client, self.cache_key, res) end
  observe(self, res, nil)
  return res
end

--- An attempt that got a 2xx reply failed (a broken or cut stream, a
-- malformed body): the provider bills what it generated, so the counted
-- prompt plus the tokens of what arrived is billed.  `partial` is the
-- Response of what arrived (nil for a plain reply): it gets usage and cost.
function Call:bill_failed(partial)
  local res = partial or { choices = {} }
  self:finish(res)
  self:bill(res.usage, res.cost)
  return partial
end

--- The attempt failed with err.  delivered: the caller already has output
-- (a stream), so neither a retry nor a fallback is possible.
-- -> true: try again (the backoff was slept, or the next model is current);
--    false: the call failed (call:error()).
function Call:failed(err, delivered)
  self:release()
  local model = self.chain[self.mi]
  err.attempts = self.model_attempts
  err.model = err.model or model
  if not delivered and not self.cancelled and self.model_attempts > 0
      and self.model_attempts <= self.max_retries and retry.should_retry(err) then
    -- a dead kept-alive connection must not be picked again from the pool
    self.fresh = err.kind == "connect"
    self.rt.sleep(retry.delay(err, self.model_attempts - 1))
    if not self.cancelled then return true end
    err = cancelled_error(model)
  end
  self:settle()
  self.ready = nil
  local errs = self.errs
  if not errs then errs = {}; self.errs = errs end
  errs[#errs + 1] = err
  if delivered or self.cancelled or err.kind == "cancelled" or not M.fallback_ok(err)
      or self.mi >= #self.chain then
    return false
  end
  self.mi = self.mi + 1
  self.model_attempts = 0
  return true
end

--- The kinds after which the next fallback model is tried: the model or
-- its provider failed, not the request or the caller.
function M.fallback_ok(err)
  local k = err.kind
  return k == "rate_limit" or k == "server" or k == "timeout" or k == "connect" or k == "protocol"
    or k == "http" or k == "context_length" or k == "budget"
    or (k == "invalid_request" and (err.status == 404 or err.code == "model_not_found"))
end

--- The call's error: the last model's, naming the requested model and
-- listing every model's failure when fallbacks were tried; every secret
-- of the client removed from it (message, body, headers, partial, ...).
function Call:error()
  local errs = self.errs
  local last = errs[#errs]
  if #errs > 1 then
    last.fallback_errors = errs
    last.requested_model = self.chain[1]
  end
  self.client.stats.errors = self.client.stats.errors + 1
  if self.consumer then last.consumer = self.consumer end
  last.billed = self:billed()
  local err = redact.deep(last, self:secrets())
  observe(self, nil, err)
  return err
end

------------------------------------------------------------------ plain calls

local function read_all(conn)
  local first = conn:read()
  if not first then return "" end
  local b = conn:read()
  if not b then return first end -- the usual case: the whole body at once
  local parts, n = { first, b }, 2
  while true do
    b = conn:read()
    if not b then break end
    n = n + 1
    parts[n] = b
  end
  return table.concat(parts, "", 1, n)
end
M.read_all = read_all

-- One non-streamed exchange: -> res | nil, err, billed (a 2xx reply that
-- could not be used: the provider has billed it).
local function exchange(call, conn)
  local model, set = call.chain[call.mi], call:secrets()
  local status, headers, msg = conn:response()
  if not status then return nil, decode.transport_error(headers, msg, model, set) end
  local body = read_all(conn)
  local ok, kind, m = conn:result()
  local good = status >= 200 and status < 300
  if not ok then return nil, decode.transport_error(kind, m, model, set), good end
  if not good then return nil, decode.provider_error(status, body, headers, model, set) end
  local dok, obj = pcall(json.decode, body)
  if not dok or type(obj) ~= "table" then
    return nil, decode.protocol_error("reply is not valid JSON", body, status, headers, model, set), true
  end
  if decode.nn(obj.error) ~= nil then
    -- some gateways answer 200 with an error object
    return nil, decode.provider_error(status, obj, headers, model, set)
  end
  if type(obj.choices) ~= "table" then
    return nil, decode.protocol_error("reply is not a chat completion (no 'choices')", body, status, headers,
      model, set), true
  end
  local res, why = decode.response(obj)
  if not res then
    return nil, decode.protocol_error("malformed chat completion: " .. why, nil, status, headers, model, set), true
  end
  res.headers = headers
  return res
end

--- A non-streamed call, every attempt: -> Response | nil, err
function M.plain(call)
  while true do
    local conn, err = call:open()
    if conn then
      local ok, res, e, billed = pcall(exchange, call, conn)
      if not ok then
        conn:cancel()
        call:abort()
        error(res, 0)
      end
      if res then return call:succeeded(res) end
      if billed then call:bill_failed(nil) end
      err = e
    end
    if not call:failed(err, false) then return nil, call:error() end
  end
end

M.Call = Call
return M
