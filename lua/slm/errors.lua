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
}
M.KINDS = KINDS

local Error = {}
Error.__index = Error
Error.__name = "slm.Error"
M.Error = Error

function Error.__tostring(e)
  local s = "slm: " .. e.kind
  if e.status and e.status > 0 then s = s .. format(" (HTTP %d)", e.status) end
  if e.model then s = s .. " [" .. e.model .. "]" end
  if e.message and e.message ~= "" then s = s .. ": " .. e.message end
  if e.attempts and e.attempts > 1 then s = s .. format(" (after %d attempts)", e.attempts) end
  return s
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

--- Map an HTTP status (and the provider's error code) to a kind.
function M.kind_for_status(status, code)
  if status == 401 or status == 403 then return "auth" end
  if status == 429 then return "rate_limit" end
  if status == 400 and code == "context_length_exceeded" then return "context_length" end
  if status == 400 or status == 404 or status == 422 then return "invalid_request" end
  if status >= 500 then return "server" end
  return "http"
end

return M
