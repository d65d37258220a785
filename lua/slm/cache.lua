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
local core = require "slm.core"
local json = require "slm.json"
local decode = require "slm.decode"

local type, pairs, ipairs, pcall, sha256 = type, pairs, ipairs, pcall, core.sha256

local M = {}

local FORMAT = 1

--- Whether a request body is deterministic enough to be cached.
function M.deterministic(body)
  return body.temperature == 0 or (body.seed ~= nil and body.seed ~= json.null)
end

--- The cache key of a body for model at base_url, or nil (not cacheable).
function M.key(base_url, model, body)
  if not M.deterministic(body) then return nil end
  local canon = {}
  for k, v in pairs(body) do
    if k ~= "stream" and k ~= "stream_options" then canon[k] = v end
  end
  canon.model = model
  local ok, s = pcall(json.encode, { v = FORMAT, url = base_url, body = canon })
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
    v = FORMAT, id = res.id, model = res.model, created = res.created,
    system_fingerprint = res.system_fingerprint, choices = choices,
    usage = { prompt_tokens = u.prompt_tokens, completion_tokens = u.completion_tokens,
      total_tokens = u.total_tokens },
    cost = res.cost or nil,
  })
  local stats = client.stats
  if ok then ok = pcall(client.cache.set, client.cache, key, doc) and true end
  if not ok then stats.cache_errors = stats.cache_errors + 1 end
end

--- The cached Response under key, or nil.
function M.get(client, key)
  local stats = client.stats
  local ok, text = pcall(client.cache.get, client.cache, key)
  if not ok then
    stats.cache_errors = stats.cache_errors + 1
    return nil
  end
  if type(text) ~= "string" then return nil end
  local dok, doc = pcall(json.decode, text)
  if not dok or type(doc) ~= "table" or doc.v ~= FORMAT or type(doc.choices) ~= "table" then
    stats.cache_errors = stats.cache_errors + 1
    return nil
  end
  local res = decode.response(doc)
  if not res then
    stats.cache_errors = stats.cache_errors + 1
    return nil
  end
  res.raw_usage = nil
  res.cached = true
  res.cached_usage = type(doc.usage) == "table" and doc.usage or nil
  res.cached_cost = type(doc.cost) == "number" and doc.cost or nil
  res.usage = { prompt_tokens = 0, completion_tokens = 0, total_tokens = 0, cached = true }
  res.cost = 0
  res.headers, res.request_id = nil, nil
  stats.cached = stats.cached + 1
  return res
end

return M
