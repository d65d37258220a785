-- slm.cache: the client's exact-match response cache.  A deterministic
-- request (temperature 0, or a seed given) is looked up by the SHA-256 of
-- its canonical form (the endpoint, the model and the whole body, object
-- keys sorted by slm.json; `stream` and `stream_options` left out, so a
-- streamed and a plain call share an entry) in a cache object:
--
--   c:get(key) -> string | nil        c:set(key, value, ttl)
--
-- (slm.shdict.cache, slm.redis' cache, or a table of your own).  A hit is
-- served without sending anything: no rate limit, slot or budget is taken,
-- res.cached = true, res.usage is zero (flagged cached = true) and the
-- usage the reply first cost is in res.cached_usage.  Only replies that
-- completed are stored: a stream once it ended with its finish_reason,
-- never an error, a cut or cancelled stream, or a reply whose
-- finish_reason is not "stop" or "tool_calls".  A cache that fails is
-- passed by (counted in client.stats.cache_errors): it never fails a call.
-- An entry names the key it was stored under and is checked when read:
-- a cache that answers with another request's entry, or with anything but
-- a completed reply, is a failing cache (counted), never served.
--
-- M.scope(client, opts): the credentials a request goes out with (the API
-- key, credential, organization and project headers) as a SHA-256, for M.key's
-- `scope`, so that clients with different keys (tenants, organizations)
-- never share entries; the key itself appears in no cache key or value.
local core = require "slm.core"
local json = require "slm.json"
local decode = require "slm.decode"
local options = require "slm.options"

local type, pairs, ipairs, pcall, tostring, tonumber, concat, sha256 =
  type, pairs, ipairs, pcall, tostring, tonumber, table.concat, core.sha256

local M = {}

local FORMAT = 2 -- 2: entries carry their key (older ones are never looked up: the key has FORMAT in it)
M.FORMAT = FORMAT

--- Whether a request body is deterministic enough to be cached.
function M.deterministic(body)
  return body.temperature == 0 or (body.seed ~= nil and body.seed ~= json.null)
end

-- Header lines that say who is asking: credentials (options.secret_header:
-- Authorization, api-key, *token*, ...) and OpenAI's organization and
-- project; not a trace id or a scenario, which would make every key new.
local function who(lines, out, tag)
  if type(lines) ~= "table" then return end
  for _, line in ipairs(lines) do
    local name = type(line) == "string" and line:match("^([^:]+):")
    if name and (options.secret_header(name) or name:lower() == "openai-organization"
        or name:lower() == "openai-project") then
      out[#out + 1] = tag .. line
    end
  end
end

--- The credentials of a request (the client's API key, the credential,
-- organization and project headers of the client and of the request) as
-- one SHA-256 (hex); "" for a table that is not an slm.client.  Two
-- requests with different keys get different scopes; the scope never
-- shows the key.
function M.scope(client, opts)
  local parts = {}
  if type(client) == "table" and type(client._secret) == "function" then
    parts[1] = "key:" .. tostring(client:_secret() or "")
    who(client:_headers(), parts, "client:")
  end
  who(type(opts) == "table" and opts.header_list, parts, "request:")
  if not parts[1] then return "" end
  return sha256(concat(parts, "\0"))
end

--- The cache key of a body for model at base_url (within `scope`, from
-- M.scope: optional), or nil (not cacheable).
function M.key(base_url, model, body, scope)
  if not M.deterministic(body) then return nil end
  local canon = {}
  for k, v in pairs(body) do
    if k ~= "stream" and k ~= "stream_options" then canon[k] = v end
  end
  canon.model = model
  local ok, s = pcall(json.encode, { v = FORMAT, url = base_url, body = canon, scope = scope or "" })
  if not ok then return nil end
  return sha256(s)
end

local function storable(res)
  local ch = res.choices
  if type(ch) ~= "table" or not ch[1] then return false end
  for i = 1, #ch do
    local fr = ch[i].finish_reason
    if fr ~= "stop" and fr ~= "tool_calls" then return false end
  end
  return true
end

--- Store a finished Response under key (a failure is counted, not raised).
function M.put(client, key, res)
  if not storable(res) then return end
  local choices = {}
  for i, c in ipairs(res.choices) do
    choices[i] = { index = c.index, message = c.message, finish_reason = c.finish_reason }
  end
  local u = res.usage or {}
  local ok, doc = pcall(json.encode, {
    v = FORMAT, key = key, id = res.id, model = res.model, created = res.created,
    system_fingerprint = res.system_fingerprint, choices = choices,
    usage = { prompt_tokens = u.prompt_tokens, completion_tokens = u.completion_tokens,
      total_tokens = u.total_tokens },
    cost = res.cost or nil,
  })
  local stats = client.stats
  if ok then
    -- raised, or nil, err (slm.shdict's and slm.redis' caches: full, down)
    local sok, r, serr = pcall(client.cache.set, client.cache, key, doc)
    ok = sok and not (r == nil and serr ~= nil)
  end
  if not ok then stats.cache_errors = stats.cache_errors + 1 end
end

-- Whether a decoded entry is one put() could have written under key: its
-- key, and choices that completed, each with a message whose content is
-- text (or absent, with tool calls).
local function valid(doc, key)
  if type(doc) ~= "table" or doc.v ~= FORMAT or doc.key ~= key then return false end
  local ch = doc.choices
  if type(ch) ~= "table" or ch[1] == nil then return false end
  local n = 0
  for _ in pairs(ch) do n = n + 1 end
  if n ~= #ch then return false end
  for i = 1, n do
    local c = ch[i]
    if type(c) ~= "table" or type(c.message) ~= "table" then return false end
    local fr, m = c.finish_reason, c.message
    if fr ~= "stop" and fr ~= "tool_calls" then return false end
    local content = m.content
    if content ~= nil and content ~= json.null and type(content) ~= "string" then return false end
    if m.tool_calls ~= nil and m.tool_calls ~= json.null and type(m.tool_calls) ~= "table" then return false end
    if fr == "tool_calls" and type(m.tool_calls) ~= "table" then return false end
  end
  if doc.usage ~= nil and type(doc.usage) ~= "table" then return false end
  return true
end

--- The cached Response under key, or nil.
function M.get(client, key)
  local stats = client.stats
  local ok, text, gerr = pcall(client.cache.get, client.cache, key)
  if not ok or (text == nil and gerr ~= nil) then -- raised, or nil, err (slm.redis' cache)
    stats.cache_errors = stats.cache_errors + 1
    return nil
  end
  if text == nil or text == false or (ngx and text == ngx.null) then return nil end -- a miss
  if type(text) ~= "string" then
    stats.cache_errors = stats.cache_errors + 1
    return nil
  end
  local dok, doc = pcall(json.decode, text)
  if not dok or not valid(doc, key) then
    stats.cache_errors = stats.cache_errors + 1
    return nil
  end
  local rok, res = pcall(decode.response, doc)
  if not rok or not res then
    stats.cache_errors = stats.cache_errors + 1
    return nil
  end
  res.raw_usage = nil
  res.cached = true
  local cu = doc.usage
  res.cached_usage = type(cu) == "table" and { prompt_tokens = tonumber(cu.prompt_tokens),
    completion_tokens = tonumber(cu.completion_tokens), total_tokens = tonumber(cu.total_tokens) } or nil
  res.cached_cost = type(doc.cost) == "number" and doc.cost or nil
  res.usage = { prompt_tokens = 0, completion_tokens = 0, total_tokens = 0, cached = true }
  res.cost = 0
  res.headers, res.request_id = nil, nil
  stats.cached = stats.cached + 1
  return res
end

return M
