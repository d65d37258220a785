-- slm.client: the public calls.  A client holds its options (slm.options),
-- its runtime (how bytes move: slm.transport.*), its secrets (kept out of
-- the client table) and its stats; every call goes through one attempt
-- pipeline (slm.pipeline: guard, retries, fallback, rate limits, slot),
-- streamed ones through slm.stream on top of it.  Knows nothing of prompts
-- (slm.tasks).
local options = require "slm.options"
local redact = require "slm.redact"
local pipeline = require "slm.pipeline"
local stream = require "slm.stream"
local runtime = require "slm.runtime"
local decode = require "slm.decode"
local mask = require "slm.mask"

local type, pairs, ipairs, setmetatable, error, pcall, format, getenv =
  type, pairs, ipairs, setmetatable, error, pcall, string.format, os.getenv

local VERSION = "0.1.0"

local M = { VERSION = VERSION, Response = decode.Response, Stream = stream.Stream }
M.OPTIONS = options.CLIENT

local Client = {}
Client.__index = Client
Client.__name = "slm.Client"

-- client -> { key = api key, set = redact set }: never in the client table,
-- so never in tostring(client), a dump of it, an error or a log line.
local secrets = setmetatable({}, { __mode = "k" })

local function env_option(name, value, where)
  if value == nil then return nil end
  local spec = options.CLIENT[name]
  if not spec[1](value) then
    error(format("slm.client: %s must be %s", where, spec[2]), 3)
  end
  return value
end

--- slm.client(opts) -> client
function M.new(opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("slm.client: expected an options table, got " .. type(opts), 2) end
  local copy, why = options.plain_copy(opts)
  if not copy then error("slm.client: the options table cannot be read (" .. why .. ")", 2) end
  opts = copy
  for k, v in pairs(opts) do options.check("slm.client", options.CLIENT, k, v, 2) end
  if type(opts.mask_pii) == "table" then
    local ok, why = pcall(require("slm.pii").new, opts.mask_pii)
    if not ok then error("slm.client: option 'mask_pii': " .. tostring(why):gsub("^[^:]*:%d+: ", ""), 2) end
  end
  local base = opts.base_url
    or env_option("base_url", getenv("SLM_BASE_URL") or getenv("OPENAI_BASE_URL"),
      "SLM_BASE_URL / OPENAI_BASE_URL")
    or "https://api.openai.com/v1"
  base = base:gsub("/+$", "")
  local key = opts.api_key
    or env_option("api_key", getenv("SLM_API_KEY") or getenv("OPENAI_API_KEY"), "SLM_API_KEY / OPENAI_API_KEY")
  local rt = runtime.get(opts.transport)
  local c = setmetatable({
    base_url = options.url_display(base),
    model = opts.model or getenv("SLM_MODEL") or "gpt-4o-mini",
    timeout = opts.timeout or 60,
    connect_timeout = opts.connect_timeout or 10,
    stall_timeout = opts.stall_timeout or 30,
    max_retries = opts.max_retries or 2,
    fallback = opts.fallback or {},
    budget = opts.budget,
    max_concurrency = opts.max_concurrency, -- nil: no cap of the client's own
    rpm = opts.rpm, tpm = opts.tpm,
    cache = opts.cache, quotas = opts.quotas,
    check_context = opts.check_context ~= false,
    mask_pii = opts.mask_pii,
    max_body = opts.max_body or 64 * 1024 * 1024,
    ca_file = opts.ca_file, http_version = opts.http_version,
    observe = opts.observe,
    runtime = rt,
    user_agent = opts.user_agent or ("lua-slm/" .. VERSION),
    stats = { requests = 0, attempts = 0, prompt_tokens = 0, completion_tokens = 0, cost = 0, errors = 0,
      unpriced = 0, cached = 0, cache_errors = 0 },
  }, Client)
  c.base_url_display = c.base_url
  -- the real URL (with its password) is a secret too; kept with the key
  local secret_list = {}
  if key then secret_list[#secret_list + 1] = key end
  options.add_url_secrets(secret_list, base)
  local hdrs = { "Content-Type: application/json", "User-Agent: " .. c.user_agent }
  if opts.organization then hdrs[#hdrs + 1] = "OpenAI-Organization: " .. opts.organization end
  if opts.project then hdrs[#hdrs + 1] = "OpenAI-Project: " .. opts.project end
  if opts.headers then
    for _, line in ipairs(options.header_lines(opts.headers)) do hdrs[#hdrs + 1] = line end
    for k, v in pairs(opts.headers) do
      if options.secret_header(k) then options.add_secret_value(secret_list, v) end
    end
  end
  -- the header lines may carry secret values (api-key: ...): kept with the key
  secrets[c] = { key = key, url = base .. "/chat/completions", base = base, set = redact.set(secret_list),
    list = secret_list, headers = hdrs }
  -- OpenAI's own endpoint without a key can only answer 401: say so before sending
  c.key_missing = (key == nil or key == "") and base:match("^https?://api%.openai%.com[:/]?") ~= nil
  -- a number: this client's own (in-process) limit; an object: a shared
  -- one (slm.shdict, slm.redis), used through the same calls
  local mc = c.max_concurrency
  if type(mc) == "number" then c.sem = rt.semaphore(mc) elseif mc then c.shared_sem = mc end
  local ratelimit = require "slm.ratelimit"
  local rpm, tpm = c.rpm, c.tpm
  if rpm then c.rpm_bucket = type(rpm) == "number" and ratelimit.new(rpm, 60, rt) or rpm end
  if tpm then c.tpm_bucket = type(tpm) == "number" and ratelimit.new(tpm, 60, rt) or tpm end
  return c
end

function Client:__tostring()
  local s = secrets[self]
  return format("slm.client(%s, model=%s, api_key=%s)", self.base_url, self.model,
    s.key and s.key ~= "" and "<redacted>" or "<none>")
end

function Client:has_api_key()
  local k = secrets[self].key
  return k ~= nil and k ~= ""
end

-- For the pipeline only: the key (Authorization header), the request URL
-- (which may carry a password), the set of secrets to redact.
function Client:_secret() return secrets[self].key end
function Client:_secrets() return secrets[self].set end
function Client:_secret_list() return secrets[self].list end
function Client:_headers() return secrets[self].headers end
function Client:_url() return secrets[self].url end
function Client:_base() return secrets[self].base end

-- Hand every delta of s to on_delta; stop when it returns false.
local function deliver(s, on_delta)
  local next_delta = s.next
  while true do
    local text, chunk = next_delta(s)
    if text == nil then return end
    if on_delta and on_delta(text, chunk) == false then
      s:close()
      return
    end
  end
end

--- client:chat(req) -> Response | nil, err
function Client:chat(req)
  local body, opts = options.request(req, "slm: client:chat", 2)
  -- on_delta streams the call (as the tasks' on_delta does); it was once
  -- ignored without stream = true, the caller waiting for deltas never given
  if opts.on_delta ~= nil and not opts.stream then
    if opts.stream == false then error("slm: client:chat: 'on_delta' needs a stream; 'stream = false' contradicts it", 2) end
    opts.stream = true
  end
  local m = mask.masker(self.mask_pii, opts.mask_pii)
  if m then mask.request(body, m) end
  if not opts.stream then
    local call = pipeline.new(self, body, opts, false)
    local res, err = call:cached()
    if not res then res, err = pipeline.plain(call) end
    if m then return mask.result(m, res, err) end
    return res, err
  end
  local on_delta = opts.on_delta
  -- an on_delta that takes only the text never needs a chunk decoded or made
  local info = on_delta and debug.getinfo(on_delta, "u")
  local chunks = not (info and info.nparams and info.nparams < 2 and not info.isvararg)
  local flush, given
  if m and on_delta then on_delta, flush, given = mask.on_delta(m, on_delta, chunks) end
  local s = stream.new(pipeline.new(self, body, opts, true), chunks)
  if s.call.cache_key then s = stream.cached(s) end
  -- one pcall around the whole loop, not one per delta: an error raised by
  -- the callback (or anything else) stops the transfer, gives back what
  -- the call holds, and is raised again here
  local ok, err = pcall(deliver, s, on_delta)
  if ok and flush and not s.err then ok, err = pcall(flush) end
  if not ok then
    s:close()
    error(err, 0)
  end
  if m then
    local res, rerr = s:result()
    return mask.result(m, res, rerr, given and given())
  end
  return s:result()
end

--- client:stream(req) -> Stream (iterate with `for text, chunk in s do`),
-- then s:result() -> Response | nil, err.  Retries and fallback models are
-- tried while nothing has reached the caller.
function Client:stream(req)
  local body, opts = options.request(req, "slm: client:stream", 2)
  if opts.on_delta then error("slm: client:stream: use the iterator, not 'on_delta'", 2) end
  if opts.stream == false then error("slm: client:stream: 'stream = false' contradicts the call", 2) end
  local m = mask.masker(self.mask_pii, opts.mask_pii)
  if m then mask.request(body, m) end
  local s = stream.new(pipeline.new(self, body, opts, true))
  if s.call.cache_key then s = stream.cached(s) end
  if m then s = mask.stream(s, m) end
  return s, nil, nil, s
end

--- client:request{ method, path, body | multipart, headers, query, raw }
-- -> { status, headers, body, json } | nil, err: the provider's other
-- endpoints (files, batches), with this client's URL, key, headers,
-- timeouts and retries (slm.request).
function Client:request(spec)
  return require("slm.request").call(self, spec)
end

M.Client = Client
return M
