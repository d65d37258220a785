-- slm.options: the client's and the requests' options: what each one
-- accepts, checked at once (misuse raises, naming the option), and the
-- header lists they turn into.
local type, pairs, ipairs, tostring, error, format, sort, huge, next, pcall, getmetatable =
  type, pairs, ipairs, tostring, error, string.format, table.sort, math.huge, next, pcall, getmetatable

local M = {}

-- The roles whose messages OpenAI's spec requires content for (a string
-- or a non-empty list of content parts); an assistant message needs
-- content unless it carries tool_calls (or the older function_call).
-- Other roles are a gateway's business and pass unchecked.
local NEEDS_CONTENT = { system = true, developer = true, user = true, tool = true }

-- A string, or a list (not an object: {type = "text", ...} alone is one
-- part, which the spec does not take) of parts, each a table with a
-- string `type`; a text part has its text.  -> ok, what is wrong
local function content_ok(c)
  if type(c) == "string" then return true end
  if type(c) ~= "table" or next(c) == nil then return false end
  local n = #c
  if n == 0 then return false, "a list of content parts, not one part on its own: wrap it in { }" end
  for k in pairs(c) do
    if type(k) ~= "number" or k < 1 or k > n or k % 1 ~= 0 then return false end
  end
  for i = 1, n do
    local p = c[i]
    if type(p) ~= "table" or type(p.type) ~= "string" then
      return false, format("content part %d is not a table with a string 'type'", i)
    end
    if p.type == "text" and type(p.text) ~= "string" then
      return false, format("content part %d (text) has no string 'text'", i)
    end
  end
  return true
end

-- What is wrong with a message, or nil.
local function message_problem(m)
  local role, c = m.role, m.content
  if NEEDS_CONTENT[role] then
    local ok, why = content_ok(c)
    if not ok then
      return "needs 'content': a string or a non-empty list of content parts" .. (why and " (" .. why .. ")" or "")
    end
    if role == "tool" and type(m.tool_call_id) ~= "string" then
      return "needs 'tool_call_id': the id of the tool call it answers"
    end
  elseif role == "assistant" then
    if c == nil or type(c) == "userdata" then -- absent or JSON null
      if m.tool_calls == nil and m.function_call == nil then return "needs 'content' or 'tool_calls'" end
    elseif not content_ok(c) then
      local _, why = content_ok(c)
      return "has a 'content' that is neither a string nor a list of content parts" .. (why and " (" .. why .. ")" or "")
    end
  end
  return nil
end

------------------------------------------------------------------ checkers

-- A string that may go into an HTTP header line or a URL: no CR, LF or NUL
-- (libcurl would cut a NUL silently, and a line break would inject headers).
local function header_safe(v) return type(v) == "string" and not v:find("[%z\r\n]") end
M.header_safe = header_safe

local function is_list_of_strings(v)
  if type(v) ~= "table" then return false end
  for k, x in pairs(v) do
    if type(k) ~= "number" or type(x) ~= "string" then return false end
  end
  for i = 1, #v do if v[i] == nil then return false end end
  return true
end

-- RFC 9110 token characters for header names
local function token(k) return type(k) == "string" and k ~= "" and not k:find("[^%w!#$%%&'*+%-.^_`|~]") end

local function header_map(v)
  if type(v) ~= "table" then return false end
  for k, x in pairs(v) do
    if not token(k) then return false, format("header name %q is not a token", tostring(k)) end
    if type(x) == "number" then x = tostring(x) end
    if not header_safe(x) then
      return false, format("header '%s' must be a string without CR, LF or NUL", k)
    end
  end
  return true
end

-- finite: math.huge would reach libcurl as a negative or wrapped number
local function seconds(v) return type(v) == "number" and v > 0 and v < huge end
local function nonneg_int(v) return type(v) == "number" and v >= 0 and v < huge and v % 1 == 0 end
local function pos_int(v) return type(v) == "number" and v >= 1 and v < huge and v % 1 == 0 end
-- a count of tokens or choices: at most 2^53 (beyond, a double is no
-- longer an exact integer, and the checks' arithmetic and messages break)
local MAX_COUNT = 2 ^ 53
local function count(v) return pos_int(v) and v <= MAX_COUNT end
local COUNTS = { "max_tokens", "max_completion_tokens", "n" } -- the request's counts
local function positive(v) return type(v) == "number" and v > 0 and v < huge end
local function boolean(v) return type(v) == "boolean" end
local function is_budget(v) return type(v) == "table" and type(v.reserve) == "function" and type(v.settle) == "function" end
-- shared limits (slm.shdict, slm.redis, your own): duck-typed by their methods
local function has(v, a, b)
  return type(v) == "table" and type(v[a]) == "function" and (b == nil or type(v[b]) == "function")
end
local function limiter(v) return positive(v) or has(v, "take") end
local function slots(v) return pos_int(v) or has(v, "acquire", "release") end
local function base_url(v)
  return header_safe(v) and v:match("^https?://[^/%s]") ~= nil and not v:find("%s")
end
local function runtime(v)
  if type(v) == "string" then return v == "curl" or v == "ngx" end
  return type(v) == "table" and type(v.open) == "function" and type(v.sleep) == "function"
    and type(v.semaphore) == "function" and type(v.now) == "function" and type(v.spawn) == "function"
end

local SECONDS = "a positive finite number of seconds"
local TEXT = "a string without CR, LF or NUL"

M.CLIENT = {
  base_url = { base_url, "an http(s) URL without spaces, CR, LF or NUL" },
  api_key = { header_safe, TEXT },
  model = { function(v) return type(v) == "string" and v ~= "" end, "a model name string" },
  timeout = { seconds, SECONDS },
  connect_timeout = { seconds, SECONDS },
  stall_timeout = { seconds, SECONDS },
  max_retries = { nonneg_int, "a non-negative integer" },
  fallback = { is_list_of_strings, "a list of model names" },
  budget = { is_budget, "a slm.budget" },
  max_concurrency = { slots, "a positive integer or a semaphore (acquire, release)" },
  rpm = { limiter, "a positive number (requests per minute) or a limiter (take)" },
  tpm = { limiter, "a positive number (tokens per minute) or a limiter (take)" },
  cache = { function(v) return has(v, "get", "set") end, "a cache (get, set)" },
  quotas = { function(v) return has(v, "consumer") end, "a slm.quotas" },
  headers = { header_map, "a table of header name -> string value" },
  organization = { header_safe, TEXT },
  project = { header_safe, TEXT },
  user_agent = { header_safe, TEXT },
  check_context = { boolean, "a boolean" },
  mask_pii = { function(v) return type(v) == "boolean" or type(v) == "table" end,
    "a boolean or a slm.pii options table" },
  max_body = { pos_int, "a positive integer (bytes)" },
  ca_file = { function(v) return type(v) == "string" and v ~= "" and not v:find("%z") end,
    "a path string (PEM CA certificates)" },
  http_version = { function(v) return v == "1.1" or v == "2" end, '"1.1" or "2"' },
  transport = { runtime, 'a runtime (a table with open, sleep, semaphore, now, spawn) or "curl" / "ngx"' },
  -- called once per finished call with what it did (pipeline.lua, "observe")
  observe = { function(v) return type(v) == "function" end, "a function (event)" },
}

-- Request options that are ours, not part of the chat-completions body.
M.REQUEST = {
  stream = { boolean, "a boolean" },
  on_delta = { function(v) return type(v) == "function" end, "a function" },
  timeout = { seconds, SECONDS },
  budget = { is_budget, "a slm.budget" },
  consumer = { function(v) return type(v) == "string" and v ~= "" end, "a non-empty string (the consumer's key)" },
  max_retries = { nonneg_int, "a non-negative integer" },
  fallback = { function(v) return v == false or is_list_of_strings(v) end, "a list of model names or false" },
  check_context = { boolean, "a boolean" },
  headers = { header_map, "a table of header name -> string value" },
  mask_pii = { function(v) return type(v) == "boolean" or type(v) == "table" end,
    "a boolean or a slm.pii options table" },
}

-- tostring that never raises (a __tostring or __name of the user's may)
local function safe_tostring(v)
  local ok, s = pcall(tostring, v)
  if ok and type(s) == "string" then return s end
  return "a " .. type(v)
end
M.safe_tostring = safe_tostring

-- The message of an error a user's metamethod raised, as one line.
local function raised(e)
  return (safe_tostring(e):gsub("[\r\n]+", " "))
end
M.raised = raised

--- A plain copy of the table t (its pairs, __pairs honoured), or nil, why
-- when reading it raises (a proxy table whose metamethods fail).
local function copy_into(t, copy) for k, v in pairs(t) do copy[k] = v end end
function M.plain_copy(t)
  local copy = {}
  local ok, e = pcall(copy_into, t, copy)
  if not ok then return nil, raised(e) end
  return copy
end

-- What is wrong with the messages, or nil (run under one pcall for the
-- whole list: a table whose metamethods raise makes it raise, and
-- `reading` says at which message).
local reading = 0
local function messages_problem(msgs)
  reading = 0
  if type(msgs) ~= "table" or msgs[1] == nil then return "'messages' must be a non-empty list of messages" end
  for i = 1, #msgs do
    reading = i
    local m = msgs[i]
    if type(m) ~= "table" or type(m.role) ~= "string" then
      return format("messages[%d] must be a table with a string 'role'", i)
    end
    local problem = message_problem(m)
    if problem then return format("messages[%d] (%s) %s", i, m.role, problem) end
  end
end

--- Raise (at `level` above the caller) unless option k = v is known and valid.
function M.check(where, spec, k, v, level)
  local c = type(k) == "string" and spec[k] or nil
  if not c then error(format("%s: unknown option '%s'", where, safe_tostring(k)), level + 1) end
  -- a checker reading a table whose metamethods raise: refused, naming it
  local pok, ok, why = pcall(c[1], v)
  if not pok then
    error(format("%s: option '%s' must be %s, got %s (reading it raised: %s)", where, k, c[2], type(v),
      raised(ok)), level + 1)
  end
  if not ok then
    local got = type(v)
    if got == "number" and (v ~= v or v == huge or v == -huge) then got = tostring(v) end
    error(format("%s: option '%s' must be %s, got %s%s", where, k, c[2], got,
      why and " (" .. why .. ")" or ""), level + 1)
  end
end

--- "Name: value" lines of a header map, sorted by name.
function M.header_lines(map)
  local names, list = {}, {}
  for k in pairs(map) do names[#names + 1] = k end
  sort(names)
  for i, k in ipairs(names) do list[i] = k .. ": " .. tostring(map[k]) end
  return list
end

-- Header names whose values are secrets (Azure's api-key, x-api-key, ...).
function M.secret_header(name)
  local n = name:lower()
  return n == "authorization" or n == "proxy-authorization" or n:find("key", 1, true) ~= nil
    or n:find("token", 1, true) ~= nil or n:find("secret", 1, true) ~= nil
    or n:find("password", 1, true) ~= nil or n == "cookie"
end

--- The secrets in a secret header's value, appended to list: the value,
-- and the credential after an auth scheme ("Bearer sk-...": "sk-..."),
-- which is what a server echoing it shows.
function M.add_secret_value(list, v)
  v = tostring(v)
  list[#list + 1] = v
  local cred = v:match("^%a[%w%-]*%s+(%S+)%s*$")
  if cred then list[#list + 1] = cred end
end

-- A URL's userinfo (http://user:pass@host/...): scheme, user, password
-- (nil without a colon), rest.
local function userinfo(url)
  local scheme, info, rest = url:match("^(%a[%w+.-]*://)([^/@]*)@(.*)$")
  if not scheme then return nil end
  local user, pass = info:match("^([^:]*):(.*)$")
  return scheme, user or info, pass, rest
end

local function unescape(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

--- The secrets of a URL's userinfo, appended to list: its password, or a
-- userinfo without a colon (a token as the user, as some gateways take
-- it), as written and percent-decoded; and the credential of the
-- `Authorization: Basic` header that the transports build from it (the
-- base64 of the decoded user:password), which a server echoing its
-- request headers shows.  Nothing when the URL has no userinfo.
function M.add_url_secrets(list, url)
  local scheme, user, pass = userinfo(url)
  if not scheme then return list end
  local secret = pass or user
  list[#list + 1] = secret
  list[#list + 1] = unescape(secret)
  local plain = unescape(user) .. (pass and ":" .. unescape(pass) or "")
  local b64 = require("slm.core").base64_encode
  list[#list + 1] = b64(plain)
  if not pass then list[#list + 1] = b64(plain .. ":") end
  return list
end

--- The URL with that secret replaced (for tostring(client) and errors).
function M.url_display(url)
  local scheme, user, pass, rest = userinfo(url)
  if not scheme then return url end
  if pass then return scheme .. user .. ":<redacted>@" .. rest end
  return scheme .. "<redacted>@" .. rest
end

--- Split a request table into the chat-completions body and our options;
-- raises (naming the field) on misuse.
function M.request(req, where, level)
  if type(req) ~= "table" then
    error(format("%s expects a request table, got %s", where, type(req)), level + 1)
  end
  local copy = req
  if getmetatable(req) ~= nil then -- (a plain table cannot raise when read)
    local why
    copy, why = M.plain_copy(req)
    if not copy then error(format("%s: the request table cannot be read (%s)", where, why), level + 1) end
  end
  local body, opts = {}, {}
  local REQ = M.REQUEST
  for k, v in pairs(copy) do
    if REQ[k] then
      M.check(where, REQ, k, v, level + 1)
      opts[k] = v
    else
      body[k] = v
    end
  end
  local mok, problem = pcall(messages_problem, body.messages)
  if not mok then
    if reading == 0 then error(format("%s: 'messages' cannot be read (%s)", where, raised(problem)), level + 1) end
    error(format("%s: messages[%d] cannot be read (%s)", where, reading, raised(problem)), level + 1)
  end
  if problem then error(where .. ": " .. problem, level + 1) end
  if body.model ~= nil and (type(body.model) ~= "string" or body.model == "") then
    error(where .. ": 'model' must be a non-empty string", level + 1)
  end
  for i = 1, #COUNTS do
    local name = COUNTS[i]
    local v = body[name]
    if v ~= nil and not count(v) then
      error(format("%s: '%s' must be a positive integer (at most 2^53)", where, name), level + 1)
    end
  end
  if opts.headers then opts.header_list = M.header_lines(opts.headers) end
  return body, opts
end

return M
