-- The lua-slm side of tests/openresty_relay_spec.lua, inside an app nginx
-- (tests/upstream/app.conf.in): slm.ngx.relay over client:stream to the
-- simulator, a budget per worker to read back, the metrics endpoint.
local slm = require "slm"
local cjson = require "cjson.safe"

local M = { sim_url = nil }

local budget -- one per worker (the spec runs one worker)
local metrics
local clients = {}

local function get_metrics()
  metrics = metrics or slm.ngx.metrics.get{ dict = "slm_metrics",
    consumer = function() return ngx.var.http_x_consumer end }
  return metrics
end

-- One client per scenario, as an application keeps one per configuration.
local function client(scenario, retries)
  local name = (scenario or "") .. "|" .. tostring(retries)
  local c = clients[name]
  if not c then
    budget = budget or slm.budget{ usd = 100 }
    c = slm.client{ base_url = M.sim_url, api_key = "sk-test-good", model = "gpt-4o-mini", timeout = 10,
      max_retries = retries or 0, budget = budget, observe = get_metrics():observer(),
      headers = scenario and { ["X-Sim-Scenario"] = scenario } or nil }
    clients[name] = c
  end
  return c
end

local function body()
  ngx.req.read_body()
  return cjson.decode(ngx.req.get_body_data() or "") or {}
end

--- POST /relay {message, scenario, retries, max_bytes, max_seconds, form = "stream"|"request"|"push", consumer,
-- raise = "on_delta"|"final" (that callback raises at its second call; the relay's error is caught and
-- said in an `event: raised`)}
function M.relay()
  local b = body()
  local c = client(b.scenario, b.retries)
  local req = { messages = { { role = "user", content = b.message or "hello" } }, consumer = b.consumer }
  local opts = { max_bytes = b.max_bytes, max_seconds = b.max_seconds, metrics = get_metrics(),
    consumer = b.consumer }
  if b.raise then
    local calls = 0
    opts[b.raise] = function()
      calls = calls + 1
      if b.raise == "final" or calls == 2 then error("boom in " .. b.raise, 0) end
    end
  end
  local form = b.form or "stream"
  local ok, err = pcall(function()
    if form == "request" then
      opts.client = c
      slm.ngx.relay(req, opts)
    elseif form == "push" then
      req.stream = true
      slm.ngx.relay(function(emit)
        req.on_delta = emit
        return c:chat(req)
      end, opts)
    else
      slm.ngx.relay(c:stream(req), opts)
    end
  end)
  if not ok then
    if not b.raise then error(err, 0) end
    ngx.print(slm.ngx.event("raised", { error = tostring(err) }))
  end
end

--- GET /fill?n=: a slm.ngx.metrics over the small lua_shared_dict slm_metrics_tiny, n series added
-- -> {first, last, dropped, series}: the first series' value, the last one's, the drop count
function M.fill()
  local m = slm.ngx.metrics.new{ dict = "slm_metrics_tiny", vars = false }
  m:reset()
  local n = tonumber(ngx.var.arg_n) or 1000
  for i = 1, n do m:inc("app_fill_total", { i = tostring(i) }) end
  m:inc("app_fill_total", { i = "1" })
  local dict = ngx.shared.slm_metrics_tiny
  local function v(i) return dict:get('app_fill_total\t\ti="' .. i .. '"\t') end
  local text = m:text()
  ngx.header["Content-Type"] = "application/json"
  ngx.print(cjson.encode{ first = v(1), last = v(n) or cjson.null,
    dropped = tonumber(text:match("\nslm_metrics_dropped_total (%d+)")), series = #dict:get_keys(0) })
end

--- GET /budget -> {spent_usd, spent_tokens, reserved_usd, reserved_tokens}
function M.budget()
  local su, st, ru, rt = 0, 0, 0, 0
  if budget then
    su, st = budget:spent()
    ru, rt = budget:reserved()
  end
  ngx.header["Content-Type"] = "application/json"
  ngx.print(cjson.encode{ spent_usd = su, spent_tokens = st, reserved_usd = ru, reserved_tokens = rt })
end

function M.metrics() get_metrics():serve() end

return M
