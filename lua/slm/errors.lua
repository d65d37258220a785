-- slm.errors: the one error type of lua-slm.
--
-- Run-time failures (network, server, budget, malformed reply) are returned
-- as `nil, err`; err is a table with a stable `kind` and a __tostring.
-- Misuse (wrong argument types, unknown options) raises instead.
local setmetatable, tostring, type, format = setmetatable, tostring, type, string.format

local M = {}

local KINDS = {
  timeout = true, connect = true, rate_limit = true, server = true, auth = true,
  invalid_request = true, context_length = true, budget = true, protocol = true,
  cancelled = true, http = true,
  -- the task layer's
  validation = true, length = true,
  -- slm.csv / slm.jsonl: a malformed record or line, a file that cannot be read or written
  input = true,
}
M.KINDS = KINDS

local Error = {}
Error.__index = Error
Error.__name = "slm.Error"
M.Error = Error

-- "rate_limit (HTTP 429) [gpt-4o-mini]: message (after 3 attempts)"
local function describe(e, with_model)
  local s = tostring(e.kind)
  if type(e.status) == "number" and e.status > 0 then s = s .. format(" (HTTP %d)", e.status) end
  if with_model and e.model then s = s .. " [" .. tostring(e.model) .. "]" end
  if e.message and e.message ~= "" then s = s .. ": " .. tostring(e.message) end
  if type(e.attempts) == "number" and e.attempts > 1 then s = s .. format(" (after %d attempts)", e.attempts) end
  return s
end

-- When the requested model and its fallbacks all failed, the error names
-- the requested model and says how each one failed.
function Error.__tostring(e)
  local fb = e.fallback_errors
  if type(fb) == "table" and #fb > 1 then
    local parts = {}
    for i = 1, #fb do
      local f = fb[i]
      parts[i] = tostring(f.model or "?") .. ": " .. describe(f, false)
    end
    return format("slm: %s: %s and its %d fallback model%s failed: %s", tostring(e.kind),
      tostring(e.requested_model or fb[1].model or "?"), #fb - 1, #fb > 2 and "s" or "",
      table.concat(parts, "; "))
  end
  return "slm: " .. describe(e, true)
end

--- Make an error: M.new(kind, message, fields)
function M.new(kind, message, fields)
  if not KINDS[kind] then error("slm.errors: unknown error kind '" .. tostring(kind) .. "'", 2) end
  local e = fields or {}
  e.kind = kind
  e.message = message or e.message or kind
  return setmetatable(e, Error)
end

function M.is(x)
  return type(x) == "table" and getmetatable(x) == Error
end

--- Map an HTTP status (and the provider's error code, type and message)
-- to a kind: slm.decode.kind, with its one table of the ways servers say
-- the context is too small.
function M.kind_for_status(status, code, etype, message)
  return require("slm.decode").kind(status, code, etype, message)
end

return M
