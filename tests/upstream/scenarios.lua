-- tests/upstream/scenarios.lua: parse scenario directives
-- ("status=503,retry_after=1.5,fail=2") into a table. Pure Lua, shared by
-- the simulator (LuaJIT) and anyone who wants to check a spelling (5.4).

local M = {}

-- Every directive the simulator understands: name -> what its value is.
-- "flag" directives take no value. README.md documents each one.
M.known = {
  -- selection
  fail = "count", status = "http status", code = "error code", type = "error type",
  message = "error message", context = "tokens", retry_after_ms = "ms", retry_after = "seconds",
  retry_after_date = "seconds from now", should_retry = "true|false", auth = "flag",
  -- timing
  delay = "ms", body_delay = "ms", slow_chunks = "ms", stall = "ms",
  -- broken replies
  close = "flag", crash = "flag", malformed = "flag", empty = "flag", html = "flag", wrong_shape = "flag",
  -- reply content
  refusal = "flag", tools_parallel = "flag", tools_noindex = "flag", n3 = "flag",
  big = "bytes", chunks = "count", replay = "fixture name",
  -- stream framing and endings
  bytewise = "flag", cr = "flag", crlf = "flag", comments = "flag", bom = "flag", multiline = "flag",
  usage_null_choices = "flag", error_chunk = "flag", openrouter_error = "flag", event_error = "flag",
  no_done = "flag", eof_mid = "flag", reset = "flag",
  -- hostile and third-party servers
  echo_key = "json|text|event|chunk|llama", llama_error = "server|context", choices_empty = "flag",
  done_only = "flag",
  usage = "nan|inf|neg|float|huge|string|missing", usage_cost = "number|nan|neg",
  raw = "401_cut|json_cut", reply_model = "model name",
  -- task failures (the scripted model's replies gone wrong)
  invalid_json = "flag", prose_json = "flag", trailing_comma = "flag", bad_label = "flag",
  missing_field = "flag", cut = "flag", banned = "word", bad_quote = "flag",
  -- Batch API (batches.lua): a batch's own (X-Sim-Batch, POST /__sim/batch_mode)
  polls = "count", step_ms = "ms", expire = "flag|lines", flaky_polls = "count",
}

-- "a=1, b ,c=x" -> { a = "1", b = true, c = "x" }, plus a list of the
-- names it does not know (second result).
function M.parse(spec)
  local sc, unknown = {}, {}
  if type(spec) ~= "string" then return sc, unknown end
  for item in spec:gmatch("[^,]+") do
    item = item:match("^%s*(.-)%s*$")
    if item ~= "" then
      local k, v = item:match("^([%w_%-]+)%s*=%s*(.-)$")
      if not k then k, v = item, true end
      k = k:lower():gsub("%-", "_")
      sc[k] = v
      if not M.known[k] then unknown[#unknown + 1] = k end
    end
  end
  return sc, unknown
end

return M
