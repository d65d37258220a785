-- bench/json/bench.lua - slm.json.encode (csrc/json.c) against lua-cjson's
-- encode on chat request bodies, side by side in one process.
--
--   lua5.4 bench/json/bench.lua        (bench/json/run.sh sets the paths)
--
-- Each case is encoded by both in alternating rounds (BENCH_ROUNDS, default
-- 7) of about BENCH_SECONDS (default 0.15) each; the figure is the best
-- round's CPU time per call (os.clock).  Before timing, both outputs are
-- decoded and compared, so the two encode the same thing.  Not a test:
-- nothing here gates CI.
local json = require "slm.json"
local cjson = require("cjson").new()

local clock, format, rep, concat = os.clock, string.format, string.rep, table.concat
local ROUNDS = tonumber(os.getenv("BENCH_ROUNDS")) or 7
local SECONDS = tonumber(os.getenv("BENCH_SECONDS")) or 0.15

-- deterministic text: words from a list, lines of about 80 bytes
local WORDS = { "the", "invoice", "customer", "printer", "refund", "order", "shipping", "account",
  "password", "error", "\"urgent\"", "please", "support", "ticket", "delivery", "warranty", "model",
  "replace", "battery", "screen", "it's", "update", "C:\\Users\\me", "https://example.com/a/b", "thanks" }
local UTF8 = { "счёт", "клиент", "принтер", "возврат", "заказ", "доставка", "日本語", "支持", "工单",
  "😀", "é", "naïve", "Straße", "ошибка", "спасибо" }

local function text(bytes, words, seed)
  local parts, n, line, x = {}, 0, 0, seed
  while n < bytes do
    x = (x * 16807) % 2147483647 -- exact in doubles: the same text under LuaJIT
    local w = words[1 + x % #words]
    parts[#parts + 1] = w
    n, line = n + #w + 1, line + #w + 1
    if line > 80 then
      parts[#parts + 1] = "\n"
      line = 0
    else
      parts[#parts + 1] = " "
    end
  end
  return concat(parts)
end

local function chat(user)
  return {
    model = "gpt-4o-mini", temperature = 0.7, max_tokens = 500, stream = true,
    messages = {
      { role = "system", content = "You are the support assistant of ACME Printers. Answer briefly, "
        .. "in the customer's language, and never promise a refund: hand those to a human." },
      { role = "user", content = user },
    },
  }
end

local function tool(name, props, required)
  return { type = "function", ["function"] = { name = name, description = "Look up " .. name .. " in the back office",
    parameters = { type = "object", properties = props, required = required, additionalProperties = false } } }
end

local tools_req = chat(text(300, WORDS, 7))
tools_req.tool_choice = "auto"
tools_req.tools = {
  tool("order_status", { order_id = { type = "string", description = "the order number, e.g. A-1234" } }, { "order_id" }),
  tool("refund", { order_id = { type = "string" }, amount = { type = "number", minimum = 0 },
    reason = { type = "string", enum = { "damaged", "late", "other" } } }, { "order_id", "reason" }),
  tool("kb_search", { query = { type = "string" }, k = { type = "integer", minimum = 1, maximum = 20 } }, { "query" }),
  tool("escalate", { summary = { type = "string" }, priority = { type = "string", enum = { "low", "high" } } }, { "summary" }),
}

local history = chat("and now?")
for i = 1, 40 do
  history.messages[#history.messages + 1] = { role = i % 2 == 1 and "user" or "assistant", content = text(200, WORDS, i) }
end

local cases = {
  { "chat: system + user message (~400 B)", chat(text(250, WORDS, 1)) },
  { "chat + 4 tools with JSON-schema parameters", tools_req },
  { "chat history: 40 messages of ~200 B", history },
  { "100 KB document message (ASCII)", chat(text(100 * 1024, WORDS, 3)) },
  { "100 KB document message (mixed UTF-8)", chat(text(100 * 1024, UTF8, 5) .. text(2000, WORDS, 9)) },
}

local function same(a, b)
  if type(a) ~= "table" then return a == b end
  if type(b) ~= "table" then return false end
  for k, v in pairs(a) do if not same(v, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end

-- calls per round for f to run about SECONDS
local function calibrate(f, v)
  local n = 1
  while true do
    local t0 = clock()
    for _ = 1, n do f(v) end
    local dt = clock() - t0
    if dt >= SECONDS / 4 then return math.max(1, math.floor(n * SECONDS / dt)) end
    n = n * 4
  end
end

local function round(f, v, n)
  local t0 = clock()
  for _ = 1, n do f(v) end
  return (clock() - t0) / n
end

local engine = jit and jit.version or _VERSION
print(format("slm.json.encode vs lua-cjson %s encode, %s, best of %d rounds (CPU time per call)",
  cjson._VERSION or "?", engine, ROUNDS))
print(format("%-46s %9s %12s %12s %7s", "case", "bytes", "cjson us", "slm.json us", "ratio"))
for _, c in ipairs(cases) do
  local name, v = c[1], c[2]
  local a, b = cjson.encode(v), json.encode(v)
  assert(same(cjson.decode(a), cjson.decode(b)), name .. ": the two outputs differ")
  local na, nb = calibrate(cjson.encode, v), calibrate(json.encode, v)
  local best_a, best_b = math.huge, math.huge
  for _ = 1, ROUNDS do
    best_a = math.min(best_a, round(cjson.encode, v, na))
    best_b = math.min(best_b, round(json.encode, v, nb))
  end
  print(format("%-46s %9d %12.2f %12.2f %6.2fx", name, #b, best_a * 1e6, best_b * 1e6, best_a / best_b))
end
print("ratio: cjson's time / slm.json's (above 1: slm.json is faster)")
