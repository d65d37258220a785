-- slm.ngx.metrics: Prometheus metrics of lua-slm's calls, kept in a
-- lua_shared_dict so that every worker of one nginx adds to the same
-- numbers, and a text endpoint that renders them.
--
--   lua_shared_dict slm_metrics 4m;                       -- http{}
--   local metrics = require "slm.ngx.metrics"
--   local m = metrics.new{ dict = "slm_metrics", consumer = function(ev) return ngx.var.http_x_consumer end }
--   local client = slm.client{ ..., observe = m:observer() }
--   location = /metrics { content_by_lua_block { require("slm.ngx.metrics").serve() } }
--
-- The observer takes the client's observe events (slm.pipeline: one per
-- finished call) and adds: requests by outcome, errors by kind, prompt and
-- completion tokens, cost, attempts, and the latency and time-to-first-token
-- (streams) histograms, each per model and consumer.  slm.ngx.relay adds
-- the browsers that went away and the streams it cut (opts.metrics).
--
-- Keys in the dict are "family\tsuffix\tlabels\tle"; histogram buckets are
-- stored cumulative (an observation adds to every bucket it fits, and 0 to
-- the others, so that every series has all its buckets), so rendering is a
-- read, in any worker.  A series is only ever added with safe_add: a full
-- dict never evicts the other series; the increment of a series that
-- cannot be added is dropped, counted in slm_metrics_dropped_total (its
-- key is made first, when the instance is) and logged at WARN at most once
-- a minute per worker: metrics never fail a request.  Label values are made
-- valid UTF-8 (U+FFFD for bad bytes) and escaped as the text format wants;
-- they are the caller's: keep consumers a bounded set (a key's name, not
-- the key).
local type, pairs, ipairs, tostring, tonumber, error, setmetatable, format, concat, sort, huge =
  type, pairs, ipairs, tostring, tonumber, error, setmetatable, string.format, table.concat, table.sort, math.huge
local max = math.max

local M = {}

M.LATENCY_BUCKETS = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60 }
M.TTFT_BUCKETS = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10 }

-- family -> type, help; the order the endpoint prints them in
local FAMILIES = {
  { "slm_requests_total", "counter", "Finished calls by model, consumer and outcome (ok, error)." },
  { "slm_errors_total", "counter", "Failed calls by model, consumer and error kind." },
  { "slm_prompt_tokens_total", "counter", "Prompt tokens billed (every attempt)." },
  { "slm_completion_tokens_total", "counter", "Completion tokens billed (every attempt, partial streams included)." },
  { "slm_cost_usd_total", "counter", "Cost in USD at the models' prices." },
  { "slm_attempts_total", "counter", "HTTP attempts made by the calls (retries and fallbacks included)." },
  { "slm_cache_hits_total", "counter", "Calls answered from the client's cache (nothing sent, nothing billed)." },
  { "slm_request_duration_seconds", "histogram", "Latency of a call sent to a model, from its start to its end." },
  { "slm_ttft_seconds", "histogram", "Time to the first token of a streamed call." },
  { "slm_relay_aborts_total", "counter", "Streams relayed to a browser that went away before the end." },
  { "slm_relay_capped_total", "counter", "Streams relayed to a browser that were cut by a cap (bytes, duration)." },
  { "slm_metrics_dropped_total", "counter",
    "Increments dropped because their series could not be added: the lua_shared_dict is full." },
}
local FAMILY = {}
for i, f in ipairs(FAMILIES) do FAMILY[f[1]] = { order = i, kind = f[2], help = f[3] } end
M.FAMILIES = FAMILIES

local Metrics = {}
Metrics.__index = Metrics
Metrics.__name = "slm.ngx.metrics"

-- s as valid UTF-8: each byte that does not start a valid sequence (a
-- stray byte, a character cut short, an overlong form, a surrogate) is
-- U+FFFD; at most n bytes, never cutting a character (slm.redact's, as in
-- error messages).
local redact = require "slm.redact"
local valid_utf8, utf8_prefix = redact.utf8, redact.prefix
M.utf8 = valid_utf8

-- A label value as the text format wants it: valid UTF-8; \ " and newline
-- escaped; tabs and other control characters (our key separator among
-- them) as spaces.
local function esc(v)
  v = valid_utf8(tostring(v)):gsub("[%z\1-\9\11-\31\127]", " ")
  return (v:gsub("[\\\"\n]", { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" }))
end
M.escape = esc

-- labels (a table name -> value) -> 'a="x",b="y"', names sorted
local function label_text(labels)
  if not labels then return "" end
  local names = {}
  for k in pairs(labels) do names[#names + 1] = k end
  sort(names)
  local out = {}
  for i, k in ipairs(names) do
    if not k:match("^[%a_][%w_]*$") or k == "le" then
      error(format("slm.ngx.metrics: bad label name %q", tostring(k)), 3)
    end
    out[i] = k .. '="' .. esc(labels[k]) .. '"'
  end
  return concat(out, ",")
end

local function buckets_ok(b)
  if type(b) ~= "table" or b[1] == nil then return false end
  for i = 1, #b do
    if type(b[i]) ~= "number" or b[i] ~= b[i] or b[i] == huge or (i > 1 and b[i] <= b[i - 1]) then return false end
  end
  return true
end

local function key(family, suffix, labels, le)
  return family .. "\t" .. suffix .. "\t" .. labels .. "\t" .. (le or "")
end

local DROPPED = key("slm_metrics_dropped_total", "", "")

local function resolve_dict(d)
  if type(d) == "table" then return d end
  if type(d) ~= "string" then error("slm.ngx.metrics: option 'dict' must be a lua_shared_dict name or a dict", 3) end
  local shared = ngx and ngx.shared and ngx.shared[d]
  if not shared then
    error(format("slm.ngx.metrics: no lua_shared_dict '%s' (add `lua_shared_dict %s 4m;` to http{})", d, d), 3)
  end
  return shared
end

local OPTIONS = { dict = true, buckets = true, ttft_buckets = true, consumer = true, vars = true }

--- metrics.new{ dict = "slm_metrics" | dict, buckets = {...}, ttft_buckets = {...},
---   consumer = string | function(event) -> string, vars = false }
-- dict: a lua_shared_dict name (or any table with incr (without an init
-- value: nil, "not found" for a missing key), safe_add, get, get_keys and
-- delete, for tests); consumer: the label when the call names none (its request's
-- `consumer` option); vars: false to leave the access-log variables alone
-- (slm.ngx.log_vars).
function M.new(opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("slm.ngx.metrics: expected an options table", 2) end
  for k in pairs(opts) do
    if not OPTIONS[k] then error(format("slm.ngx.metrics: unknown option '%s'", tostring(k)), 2) end
  end
  local b, tb = opts.buckets or M.LATENCY_BUCKETS, opts.ttft_buckets or M.TTFT_BUCKETS
  if not buckets_ok(b) then error("slm.ngx.metrics: option 'buckets' must be increasing finite numbers", 2) end
  if not buckets_ok(tb) then error("slm.ngx.metrics: option 'ttft_buckets' must be increasing finite numbers", 2) end
  local c = opts.consumer
  if c ~= nil and type(c) ~= "string" and type(c) ~= "function" then
    error("slm.ngx.metrics: option 'consumer' must be a string or a function(event)", 2)
  end
  local m = setmetatable({ dict = resolve_dict(opts.dict or "slm_metrics"), buckets = b, ttft_buckets = tb,
    consumer = c, vars = opts.vars ~= false, warned = false, dropped = 0, histograms = {} }, Metrics)
  -- the drop counter's series exists before the dict can fill up
  m.dict:safe_add(DROPPED, 0)
  return m
end

-- A series' value raised by v, never evicting another series to make room
-- for a new one (incr with an init value would: the dict's LRU).
local function put(dict, k, v)
  local n, err = dict:incr(k, v)
  if n or err ~= "not found" then return n, err end
  local ok, aerr = dict:safe_add(k, 0)
  if not ok and aerr ~= "exists" then return nil, aerr end
  return dict:incr(k, v)
end

M.WARN_EVERY = 60 -- seconds between two WARN lines of one worker about drops

function Metrics:add(k, v)
  local ok, err = put(self.dict, k, v)
  if ok then return end
  self.dropped = self.dropped + 1
  put(self.dict, DROPPED, 1)
  local t = ngx and ngx.now and ngx.now() or os.time()
  if not self.warned or t - self.warned >= M.WARN_EVERY then
    local msg = format("slm.ngx.metrics: %d increment(s) dropped (%s): the lua_shared_dict is full, a new "
      .. "series cannot be added (no other is evicted); make it larger or keep the labels a bounded set "
      .. "(slm_metrics_dropped_total counts them; said at most every %d s per worker)", self.dropped,
      tostring(err), M.WARN_EVERY)
    self.warned, self.dropped = t, 0
    if ngx and ngx.log then ngx.log(ngx.WARN, msg) end
  end
end

--- m:inc(family, labels, v): add v (default 1) to a counter.
function Metrics:inc(family, labels, v)
  self:add(key(family, "", label_text(labels)), v or 1)
end

-- The shortest text that reads back as x (0.1, not 0.10000000000000001).
local function shortest(x)
  for p = 15, 17 do
    local s = format("%." .. p .. "g", x)
    if tonumber(s) == x then return s end
  end
  return format("%.17g", x)
end

local function le_text(x)
  if x == huge then return "+Inf" end
  return shortest(x)
end

-- One observation of a histogram: 1 to every bucket it fits, 0 to the
-- others (so that every series has all its buckets, whichever worker
-- renders them), +Inf, sum, count.
local function observe(self, family, lt, value, buckets)
  for i = 1, #buckets do
    local le = buckets[i]
    self:add(key(family, "_bucket", lt, le_text(le)), value > le and 0 or 1)
  end
  self:add(key(family, "_bucket", lt, "+Inf"), 1)
  self:add(key(family, "_sum", lt), value)
  self:add(key(family, "_count", lt), 1)
end

--- m:observe_value(family, labels, value, buckets): one observation of a
-- histogram family of your own (buckets: increasing finite numbers, the
-- latency buckets by default; keep them the same for a family), rendered
-- as a histogram with its buckets, _sum and _count.
function Metrics:observe_value(family, labels, value, buckets)
  if type(family) ~= "string" or not family:match("^[%a_:][%w_:]*$") then
    error(format("slm.ngx.metrics: bad metric name %q", tostring(family)), 2)
  end
  if FAMILY[family] and FAMILY[family].kind ~= "histogram" then
    error(format("slm.ngx.metrics: %s is lua-slm's own counter", family), 2)
  end
  if type(value) ~= "number" or value ~= value then
    error("slm.ngx.metrics: observe_value needs a number, got " .. tostring(value), 2)
  end
  buckets = buckets or self.buckets
  if not buckets_ok(buckets) then error("slm.ngx.metrics: buckets must be increasing finite numbers", 2) end
  self.histograms[family] = buckets
  observe(self, family, label_text(labels), value, buckets)
end

-- The consumer of an event: its own, else the option's.
function Metrics:consumer_of(ev)
  local c = ev.consumer
  if c == nil then
    c = self.consumer
    if type(c) == "function" then c = c(ev) end
  end
  if c == nil or c == "" then return "-" end
  -- valid UTF-8, cut at a character's boundary (a header's raw bytes)
  return utf8_prefix(valid_utf8(tostring(c)), 128)
end

-- Phases with a request whose variables the access log will show (not
-- timers, init_worker, ...).
local REQUEST_PHASE = { rewrite = true, access = true, content = true }

local function num(v)
  if type(v) == "number" and v == v and v >= 0 and v < huge then return v end
  return 0
end

--- m:record(event): one finished call (the client's observe event).
function Metrics:record(ev)
  local model, consumer = tostring(ev.model or "-"), self:consumer_of(ev)
  local base = label_text{ model = model, consumer = consumer }
  local outcome = ev.outcome == "ok" and "ok" or "error"
  self:add(key("slm_requests_total", "", label_text{ model = model, consumer = consumer, outcome = outcome }), 1)
  if outcome == "error" then
    self:add(key("slm_errors_total", "", label_text{ model = model, consumer = consumer,
      kind = tostring(ev.kind or "unknown") }), 1)
  end
  self:add(key("slm_prompt_tokens_total", "", base), num(ev.prompt_tokens))
  self:add(key("slm_completion_tokens_total", "", base), num(ev.completion_tokens))
  self:add(key("slm_cost_usd_total", "", base), num(ev.cost))
  self:add(key("slm_attempts_total", "", base), num(ev.attempts))
  if ev.cached then
    -- a cache hit: counted as a call, kept out of the latency histograms
    -- (its microseconds would hide the model's)
    self:add(key("slm_cache_hits_total", "", base), 1)
  elseif type(ev.latency) == "number" then observe(self, "slm_request_duration_seconds", base, num(ev.latency), self.buckets) end
  if type(ev.ttft) == "number" then observe(self, "slm_ttft_seconds", base, num(ev.ttft), self.ttft_buckets) end
  if self.vars and ngx and ngx.var and ngx.get_phase and REQUEST_PHASE[ngx.get_phase()] then
    require("slm.ngx").log_vars(ev, consumer)
  end
end

--- m:observer() -> function(event): for slm.client{ observe = ... }.
function Metrics:observer()
  return function(ev) return self:record(ev) end
end

-- Whether a family's series belong in the output: all of ours, and any
-- family someone added with m:inc (printed untyped, after ours).
local function family_of(k)
  return k:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
end

-- A number as the text format wants it.
local function value_text(v)
  if v == huge then return "+Inf" end
  if v % 1 == 0 and v > -1e15 and v < 1e15 then return format("%d", v) end
  return shortest(v)
end

--- m:text() -> the Prometheus text exposition (version 0.0.4) of every series.
function Metrics:text()
  local dict = self.dict
  local keys = dict:get_keys(0)
  local fams = {} -- family -> { labels -> { [suffix or le] = value } }
  local extra = {}
  local les = {} -- family -> { le text -> number }: the buckets its keys have
  for _, k in ipairs(keys) do
    local fam, suffix, lt, le = family_of(k)
    local v = fam and tonumber(dict:get(k))
    if v then
      local f = fams[fam]
      if not f then
        f = {}
        fams[fam] = f
        if not FAMILY[fam] then extra[#extra + 1] = fam end
      end
      local series = f[lt]
      if not series then series = {}; f[lt] = series end
      series[suffix == "_bucket" and ("le=" .. le) or suffix] = v
      if suffix == "_bucket" then
        local l = les[fam]
        if not l then l = {}; les[fam] = l end
        l[le] = tonumber(le) or (le == "+Inf" and huge) or nil
      end
    end
  end
  -- a custom histogram's buckets: those of its keys (every series has all
  -- of them, whichever worker observed it) and those given in this worker
  local function custom_buckets(name)
    local seen, list = {}, {}
    for _, le in ipairs(self.histograms[name] or {}) do
      seen[le_text(le)] = true
      list[#list + 1] = le
    end
    for t, le in pairs(les[name] or {}) do
      if le ~= huge and not seen[t] then
        seen[t] = true
        list[#list + 1] = le
      end
    end
    sort(list)
    return list
  end
  local out = {}
  local function braces(lt) return lt ~= "" and "{" .. lt .. "}" or "" end
  local function family_lines(name, kind, help)
    local f = fams[name]
    if help then out[#out + 1] = "# HELP " .. name .. " " .. help end
    out[#out + 1] = "# TYPE " .. name .. " " .. kind
    if not f then return end
    local sets = {}
    for lt in pairs(f) do sets[#sets + 1] = lt end
    sort(sets)
    local bk
    if kind == "histogram" then
      if FAMILY[name] then bk = name == "slm_ttft_seconds" and self.ttft_buckets or self.buckets
      else bk = custom_buckets(name) end
    end
    for _, lt in ipairs(sets) do
      local s = f[lt]
      if kind == "histogram" then
        local sep = lt ~= "" and "," or ""
        -- cumulative, never decreasing (a bucket a full dict dropped reads
        -- as the one below it)
        local acc = 0
        for _, le in ipairs(bk) do
          local t = le_text(le)
          acc = max(acc, s["le=" .. t] or 0)
          out[#out + 1] = format('%s_bucket{%s%sle="%s"} %s', name, lt, sep, t, value_text(acc))
        end
        acc = max(acc, s["le=+Inf"] or s._count or 0)
        out[#out + 1] = format('%s_bucket{%s%sle="+Inf"} %s', name, lt, sep, value_text(acc))
        out[#out + 1] = format("%s_sum%s %s", name, braces(lt), value_text(s._sum or 0))
        out[#out + 1] = format("%s_count%s %s", name, braces(lt), value_text(s._count or acc))
      else
        out[#out + 1] = format("%s%s %s", name, braces(lt), value_text(s[""] or 0))
      end
    end
  end
  for _, f in ipairs(FAMILIES) do family_lines(f[1], f[2], f[3]) end
  sort(extra)
  for _, name in ipairs(extra) do
    -- a family with buckets is a histogram (m:observe_value), else untyped (m:inc)
    family_lines(name, (les[name] or self.histograms[name]) and "histogram" or "untyped")
  end
  out[#out + 1] = ""
  return concat(out, "\n")
end

--- m:serve(): answer the current nginx request with m:text().
function Metrics:serve()
  ngx.header["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
  ngx.header["Cache-Control"] = "no-store"
  ngx.print(self:text())
end

--- m:reset(): forget every series (the dict's keys of ours).
function Metrics:reset()
  for _, k in ipairs(self.dict:get_keys(0)) do
    if family_of(k) then self.dict:delete(k) end
  end
  self.dict:safe_add(DROPPED, 0)
end

-- One instance per dict name and worker, for the module-level shortcuts.
local instances = {}

--- metrics.get(dict_name_or_opts) -> the instance of that dict (made once per worker)
function M.get(opts)
  if type(opts) == "string" then opts = { dict = opts } end
  opts = opts or {}
  local name = opts.dict or "slm_metrics"
  if type(name) ~= "string" then return M.new(opts) end
  local m = instances[name]
  if not m then
    m = M.new(opts)
    instances[name] = m
  end
  return m
end

--- metrics.observer(opts) -> function(event), of metrics.get(opts)
function M.observer(opts) return M.get(opts):observer() end

--- metrics.serve(dict_name): the text endpoint of that dict (default slm_metrics)
function M.serve(opts) return M.get(opts):serve() end

M.Metrics = Metrics
-- slm.ngx.metrics(dict) serves the endpoint, like metrics.serve(dict)
return setmetatable(M, { __call = function(_, opts) return M.serve(opts) end })
