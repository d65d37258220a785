-- slm.request: the client's path to the provider's endpoints other than
-- chat completions (files, batches, models, ...): one HTTP exchange with
-- the client's base URL, key, headers, timeouts and retries, its secrets
-- kept out of every error.  A JSON body, a multipart/form-data body (file
-- uploads) or none.
--
--   local res, err = client:request{ method = "POST", path = "/files",
--     multipart = { { name = "purpose", value = "batch" },
--                   { name = "file", filename = "in.jsonl", value = data, type = "application/jsonl" } } }
--   res.status, res.headers, res.body (text), res.json (decoded; nil with raw = true)
--
-- Errors are lua-slm's (slm.errors): a non-2xx reply is the provider's
-- error (its kind from the status), a 2xx reply that is not JSON a
-- "protocol" error, a failed exchange "connect"/"timeout".  Retried like
-- a chat attempt (slm.retry: connection errors, 408, 409, 429, >= 500).
local json = require "slm.json"
local errors = require "slm.errors"
local decode = require "slm.decode"
local retry = require "slm.retry"
local options = require "slm.options"

local type, ipairs, pairs, tostring, error, pcall, format, concat, random, setmetatable =
  type, ipairs, pairs, tostring, error, pcall, string.format, table.concat, math.random, setmetatable

local M = {}

local FIELDS = { method = "string", path = "string", body = true, multipart = "table", headers = "table",
  raw = "boolean", timeout = "number", max_retries = "number", query = "table" }
local METHODS = { GET = true, POST = true, DELETE = true, PUT = true, PATCH = true }

local function check(spec)
  if type(spec) ~= "table" then error("slm: client:request: expected a table, got " .. type(spec), 3) end
  for k, v in pairs(spec) do
    local want = FIELDS[k]
    if not want then error("slm: client:request: unknown field '" .. tostring(k) .. "'", 3) end
    if want ~= true and type(v) ~= want then
      error(format("slm: client:request: '%s' must be a %s, got %s", k, want, type(v)), 3)
    end
  end
  if type(spec.path) ~= "string" or spec.path:sub(1, 1) ~= "/" then
    error("slm: client:request: 'path' must be a string starting with '/'", 3)
  end
  if spec.body ~= nil and spec.multipart ~= nil then
    error("slm: client:request: give 'body' or 'multipart', not both", 3)
  end
  if spec.method and not METHODS[spec.method] then
    error("slm: client:request: unknown method '" .. spec.method .. "'", 3)
  end
end

local function urlencode(s)
  return (tostring(s):gsub("[^%w%-%._~]", function(c) return format("%%%02X", c:byte()) end))
end

-- "?a=1&b=x" from a table, keys sorted (stable URLs in logs and tests).
local function query_string(q)
  if not q then return "" end
  local keys = {}
  for k in pairs(q) do keys[#keys + 1] = tostring(k) end
  table.sort(keys)
  local parts = {}
  for i, k in ipairs(keys) do parts[i] = urlencode(k) .. "=" .. urlencode(q[k]) end
  return #parts > 0 and ("?" .. concat(parts, "&")) or ""
end

--- A multipart/form-data body: -> body, content-type.  parts: list of
-- { name, value, filename?, type? }; the boundary never occurs in a value.
function M.multipart(parts)
  local boundary
  repeat
    boundary = format("slm-%08x%08x", random(0, 0x7fffffff), random(0, 0x7fffffff))
    local clash = false
    for _, p in ipairs(parts) do
      if tostring(p.value):find(boundary, 1, true) then clash = true end
    end
  until not clash
  local out = {}
  for _, p in ipairs(parts) do
    if type(p.name) ~= "string" or p.value == nil then
      error("slm: client:request: each multipart part needs a name and a value", 3)
    end
    if p.name:find('["\r\n]') or (p.filename and tostring(p.filename):find('["\r\n]')) then
      error("slm: client:request: a multipart name or filename cannot hold quotes or line breaks", 3)
    end
    out[#out + 1] = "--" .. boundary .. "\r\nContent-Disposition: form-data; name=\"" .. p.name .. "\""
    if p.filename then out[#out + 1] = "; filename=\"" .. tostring(p.filename) .. "\"" end
    out[#out + 1] = "\r\n"
    if p.type then out[#out + 1] = "Content-Type: " .. p.type .. "\r\n" end
    out[#out + 1] = "\r\n"
    out[#out + 1] = tostring(p.value)
    out[#out + 1] = "\r\n"
  end
  out[#out + 1] = "--" .. boundary .. "--\r\n"
  return concat(out), "multipart/form-data; boundary=" .. boundary
end

local function headers_of(client, ctype, extra)
  local h = {}
  for _, line in ipairs(client:_headers()) do
    if not line:lower():find("^content%-type:") then h[#h + 1] = line end
  end
  if ctype then h[#h + 1] = "Content-Type: " .. ctype end
  h[#h + 1] = "Accept: application/json"
  local key = client:_secret()
  if key and key ~= "" then h[#h + 1] = "Authorization: Bearer " .. key end
  if extra then
    for _, line in ipairs(options.header_lines(extra)) do h[#h + 1] = line end
  end
  return h
end

-- One exchange: -> res | nil, err
local function exchange(client, spec, url, headers, body)
  local set = client:_secrets()
  local ok, conn = pcall(client.runtime.open, {
    url = url, method = spec.method, headers = headers, body = body,
    connect_timeout = client.connect_timeout, timeout = spec.timeout or client.timeout,
    max_body = client.max_body, ca_file = client.ca_file, http_version = client.http_version,
  })
  if not ok then error(conn, 0) end
  local status, hdrs, msg = conn:response()
  if not status then return nil, decode.transport_error(hdrs, msg, nil, set) end
  local text = require("slm.pipeline").read_all(conn)
  local rok, kind, m = conn:result()
  if not rok then return nil, decode.transport_error(kind, m, nil, set) end
  if status < 200 or status >= 300 then return nil, decode.provider_error(status, text, hdrs, nil, set) end
  local res = { status = status, headers = hdrs, body = text }
  if not spec.raw then
    local dok, obj = pcall(json.decode, text)
    if not dok or type(obj) ~= "table" then
      return nil, decode.protocol_error("reply to " .. spec.method .. " " .. spec.path .. " is not a JSON object",
        text, status, hdrs, nil, set)
    end
    res.json = obj
  end
  return res
end

--- client:request(spec) -> res | nil, err (see the header)
function M.call(client, spec)
  check(spec)
  local body, ctype = spec.body, nil
  if spec.multipart then
    body, ctype = M.multipart(spec.multipart)
  elseif type(body) == "table" then
    local ok, text = pcall(json.encode, body)
    if not ok then
      return nil, errors.new("invalid_request", "the request cannot be sent as JSON: " .. tostring(text), { status = 0 })
    end
    body, ctype = text, "application/json"
  elseif body ~= nil and type(body) ~= "string" then
    error("slm: client:request: 'body' must be a table or a string", 2)
  elseif body then
    ctype = "application/json"
  end
  local method = spec.method or (body and "POST" or "GET")
  spec = setmetatable({ method = method }, { __index = spec })
  if client.key_missing then
    return nil, errors.new("auth", "no API key for " .. client.base_url_display .. ": set SLM_API_KEY or "
      .. "OPENAI_API_KEY (or pass api_key to slm.client)", { status = 0 })
  end
  local url = client:_base() .. spec.path .. query_string(spec.query)
  local headers = headers_of(client, ctype, spec.headers)
  local max_retries = spec.max_retries or client.max_retries
  local attempts = 0
  while true do
    attempts = attempts + 1
    local res, err = exchange(client, spec, url, headers, body)
    if res then
      res.attempts = attempts
      return res
    end
    err.attempts = attempts
    if attempts > max_retries or not retry.should_retry(err) then
      return nil, require("slm.redact").deep(err, client:_secrets())
    end
    client.runtime.sleep(retry.delay(err, attempts - 1))
  end
end

return M
