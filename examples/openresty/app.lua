-- examples/openresty/app.lua: Voltamart's support chat and ticket
-- classification served by nginx, with the same lua-slm code as the
-- scripts in examples/ (slm.support, slm.classify), nothing blocking the
-- worker.  nginx.conf and locations.conf wire it:
--
--   init_by_lua_block   { require("examples.openresty.app").init() }   -- env, knowledge base
--   GET  /              the chat page (chat.html)
--   GET  /info          {"model", "backend", "simulated"} for the page
--   POST /chat          {"session", "message"} -> the reply streamed as SSE (slm.ngx.relay),
--                       ending with usage, cost, the cited sources, a handover and
--                       the session id (also the X-Session-Id header): a request
--                       without one (or with one that is not 1-64 of A-Z a-z 0-9 _ -)
--                       gets a fresh random one, never a shared conversation; an
--                       id longer than 64 characters is refused (400)
--   POST /classify      {"text"} -> {"label", "confidence", "usage", "cost", "model"}
--   GET  /metrics       Prometheus text (slm.ngx.metrics over lua_shared_dict slm_metrics)
--
-- Backend: SLM_BASE_URL / SLM_API_KEY / OPENAI_API_KEY / SLM_MODEL from the
-- environment (nginx passes them with `env`); examples/openresty/run starts
-- the bundled simulator when none is set and says so, and so does the page
-- (SLM_SIMULATED=1).  The consumer of the metrics and the access log is
-- the X-Consumer request header ("web" without one).  Sessions and the
-- budget live in each worker (slm.store.memory, slm.budget): shared stores
-- and budgets are lua_shared_dict/Redis backends of their own.
local slm = require "slm"
local json = require "slm.json"

local M = {}

local HERE = (debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "examples/openresty")
local ROOT = HERE .. "/../.."

local SYSTEM = "You are the support assistant of Voltamart, an online shop of home electronics. "
  .. "Be brief and friendly; never promise what the passages do not say."

M.LABELS = {
  billing = "payments, double charges, refunds, invoices, promo codes",
  delivery = "tracking, delays, couriers, addresses, damaged or missing parcels",
  technical = "the site, the app or a device does not work: errors, setup, faults",
  account = "login, passwords, two-factor, e-mail or phone changes",
  other = "anything else: thanks, offers, questions about products",
}

local cfg -- set by init()

local function env(name)
  local v = os.getenv(name)
  if v and v ~= "" then return v end
end

local function read(path)
  local f, err = io.open(path, "rb")
  if not f then error("examples/openresty: cannot read " .. tostring(err), 0) end
  local s = f:read("*a")
  f:close()
  return s
end

local function knowledge()
  local list = {}
  for line in read(ROOT .. "/examples/data/kb/faq.jsonl"):gmatch("[^\n]+") do
    if line:find("%S") then list[#list + 1] = json.decode(line) end
  end
  list[#list + 1] = { id = "policy", title = "Returns, Refunds and Warranty Policy",
    text = read(ROOT .. "/examples/data/kb/policies.md") }
  return list
end

--- init{ base_url, api_key, model, simulated, budget_usd, max_bytes, max_seconds, headers }
-- (init_by_lua): the options, else the environment; the knowledge base
-- read once, before the workers fork.  headers: extra request headers of
-- the client (the specs slow the simulator's streams down with them).
function M.init(opts)
  opts = opts or {}
  cfg = {
    base_url = opts.base_url or env("SLM_BASE_URL"),
    api_key = opts.api_key or env("SLM_API_KEY") or env("OPENAI_API_KEY"),
    model = opts.model or env("SLM_MODEL") or "gpt-4o-mini",
    simulated = opts.simulated or env("SLM_SIMULATED") == "1",
    budget_usd = opts.budget_usd or tonumber(env("SLM_BUDGET_USD") or "") or 5,
    max_bytes = opts.max_bytes or 16384,
    max_seconds = opts.max_seconds or 120,
    headers = opts.headers,
    knowledge = knowledge(),
  }
  if not cfg.base_url and not cfg.api_key then
    error("examples/openresty: no SLM_BASE_URL, SLM_API_KEY or OPENAI_API_KEY "
      .. "(examples/openresty/run starts the simulator for you)", 0)
  end
end

-- Per worker, made at the first request (cosockets are not allowed in
-- init_by_lua; the client picks the ngx runtime where it is made).
local state
local function get()
  if state then return state end
  local metrics = slm.ngx.metrics.get{ dict = "slm_metrics",
    consumer = function() return ngx.var.http_x_consumer or "web" end }
  local client = slm.client{
    base_url = cfg.base_url, api_key = cfg.api_key, model = cfg.model,
    max_retries = 1, timeout = 60,
    budget = slm.budget{ usd = cfg.budget_usd },
    observe = metrics:observer(), headers = cfg.headers,
  }
  local bot = slm.support.new{
    client = client, system = SYSTEM, knowledge = cfg.knowledge, store = slm.store.memory(),
    categories = { "billing", "delivery", "technical", "account", "product_question", "complaint", "other" },
  }
  state = { client = client, bot = bot, metrics = metrics }
  return state
end

local function body_json()
  ngx.req.read_body()
  local raw = ngx.req.get_body_data()
  local ok, v = pcall(json.decode, raw or "")
  if ok and type(v) == "table" then return v end
end

local function reply_json(status, t)
  ngx.status = status
  ngx.header["Content-Type"] = "application/json"
  ngx.print(json.encode(t))
end

local function bad_request(msg)
  return reply_json(400, { error = { kind = "invalid_request", message = msg } })
end

--- GET /: the chat page.
function M.page()
  ngx.header["Content-Type"] = "text/html; charset=utf-8"
  ngx.header["Cache-Control"] = "no-cache"
  ngx.print(read(HERE .. "/chat.html"))
end

--- GET /info
function M.info()
  local c = get().client
  reply_json(200, { model = cfg.model, backend = c.base_url, simulated = cfg.simulated })
end

M.MAX_SESSION = 64 -- characters of a session id

-- A fresh session id: 128 random bits from the kernel, in hex ("s-" and 32
-- digits), so that nobody can guess another's conversation.
local urandom
local function new_session()
  if not urandom then urandom = assert(io.open("/dev/urandom", "rb")) end
  local bytes = urandom:read(16)
  if not bytes or #bytes ~= 16 then error("examples/openresty: cannot read /dev/urandom", 0) end
  return "s-" .. (bytes:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end
M.new_session = new_session

--- POST /chat {session, message}: the bot's reply, streamed.
function M.chat()
  local req = body_json()
  if not req or type(req.message) ~= "string" or not req.message:find("%S") then
    return bad_request("expected a JSON body {\"session\": \"...\", \"message\": \"...\"}")
  end
  local session = req.session
  if type(session) == "string" and #session > M.MAX_SESSION then
    -- never cut: two long ids sharing their first 64 characters would share a conversation
    return bad_request("session id longer than " .. M.MAX_SESSION .. " characters")
  end
  if type(session) ~= "string" or not session:match("^[%w_-]+$") then
    -- none, or not one of ours: a conversation of its own, never a shared one
    session = new_session()
  end
  ngx.header["X-Session-Id"] = session
  local s = get()
  slm.ngx.relay(function(emit)
    return s.bot:reply(session, req.message, { on_delta = emit })
  end, {
    metrics = s.metrics, consumer = ngx.var.http_x_consumer or "web",
    max_bytes = cfg.max_bytes, max_seconds = cfg.max_seconds,
    final = function(res)
      if not res then return { session = session } end
      return { session = session, sources = res.sources, escalate = res.escalate, simulated = cfg.simulated,
        error = res.error and { kind = res.error.kind, message = res.error.message } or nil }
    end,
  })
end

--- POST /classify {text}: one label of M.LABELS.
function M.classify()
  local req = body_json()
  if not req or type(req.text) ~= "string" or not req.text:find("%S") then
    return bad_request("expected a JSON body {\"text\": \"...\"}")
  end
  local res, err = slm.classify{ client = get().client, text = req.text, labels = M.LABELS }
  if not res then
    return reply_json(slm.ngx.STATUS[err.kind] or 502, { error = { kind = err.kind, message = err.message } })
  end
  reply_json(200, { label = res.label, confidence = res.confidence, usage = res.usage, cost = res.cost,
    model = res.model, simulated = cfg.simulated })
end

--- GET /metrics
function M.metrics()
  get().metrics:serve()
end

return M
