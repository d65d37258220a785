#!/usr/bin/env lua5.4
-- examples/receipt_extract.lua: a photographed till receipt read by a
-- vision model into JSON (items, totals, VAT, payment), validated against
-- a schema and compared field by field with what the receipt says.
--
--   lua5.4 examples/receipt_extract.lua [--sim DIRECTIVES] [receipt.png [expected.json]]
--
-- Data: examples/data/receipt.png (a phone-photo-like receipt from the
-- Voltamart showroom in Riga, 600 x 900 PNG) and receipt_expected.json (its
-- structured data: seven lines, subtotal, voucher, total, 21% VAT, card).
-- slm.extract sends the image with the prompt to a model that reads
-- images: the configured one when it does, else the first of its fallbacks
-- that does (here gpt-4o-mini is the fallback of a model without vision);
-- the reply is validated against the schema below (one repair re-ask when
-- it does not fit). Then every expected field is compared with the one
-- read, numbers to the cent, and the lines item by item.
--
-- Backend: examples/lib/backend.lua (a real endpoint from OPENAI_API_KEY,
-- SLM_API_KEY or SLM_BASE_URL, else the local simulator). The simulator
-- sees no image: its "model" fills the schema from the prompt's words, so
-- its values are its own (numbers at their minimum, strings from the
-- prompt) and few fields match; the report says so. --sim DIRECTIVES
-- sends its scenario header with one X-Sim-Key for the run (e.g. --sim
-- invalid_json,fail=1: the first reply is broken and repaired).
--
-- Exit status: 0 when the receipt was read into valid JSON, 1 otherwise.

local script_dir = (arg and arg[0] or ""):match("^(.*)[/\\]") or "."
local repo_root = script_dir .. "/.."
package.path = table.concat({
  repo_root .. "/?.lua",
  repo_root .. "/lua/?.lua",
  repo_root .. "/lua/?/init.lua",
  package.path,
}, ";")
package.cpath = repo_root .. "/build/?.so;" .. package.cpath

local backend = require "examples.lib.backend"
local tf = require "examples.lib.table_fmt"
local fmt_count = backend.fmt_count

local HERMES = "nousresearch/hermes-3-llama-3.1-405b"

local USAGE = {
  "usage: lua5.4 examples/receipt_extract.lua [--sim DIRECTIVES] [receipt.png [expected.json]]",
  "  --sim D   against the simulator: its scenario directives for every request (e.g. invalid_json,fail=1)",
}

local function str(description) return { type = "string", description = description } end
local function num(description) return { type = "number", description = description } end

local SCHEMA = {
  type = "object",
  required = { "merchant", "date", "items", "subtotal", "total", "currency", "vat_rate", "vat", "payment_method" },
  properties = {
    merchant = str("the shop's name as printed at the top"),
    merchant_legal_name = str("the company's legal name"),
    merchant_address = str("the shop's address"),
    merchant_vat_number = str("the VAT number printed on the receipt"),
    receipt_number = str("the receipt's number"),
    date = { type = "string", format = "date", description = "the date, as YYYY-MM-DD" },
    time = str("the time, as HH:MM"),
    items = { type = "array", minItems = 1, items = { type = "object", required = { "name", "qty", "unit_price", "total" },
      properties = {
        name = str("the line's product name"),
        qty = { type = "number", minimum = 1, description = "quantity" },
        unit_price = num("price of one, in the receipt's currency"),
        total = num("the line's total"),
      } } },
    subtotal = num("the sum of the lines, VAT included"),
    discount = { type = "number", minimum = 0, description = "vouchers and discounts, as a positive amount" },
    vat_rate = { type = "number", minimum = 0, maximum = 100, description = "the VAT rate in percent" },
    vat = num("the VAT included in the total"),
    vat_included = { type = "boolean", description = "whether the prices include the VAT" },
    net_amount = num("the total without VAT"),
    total = num("the amount paid"),
    currency = { type = "string", enum = { "EUR", "RUB", "USD" } },
    payment_method = { type = "string", enum = { "card", "cash", "other" } },
    card_brand = str("Visa, Mastercard, ..."),
    card_last4 = { type = "string", maxLength = 4, description = "the last four digits of the card" },
  },
}

local PROMPT = "The image is a photo of a till receipt. Read it into the JSON schema: amounts as numbers in the "
  .. "receipt's currency, the date as YYYY-MM-DD, a discount as a positive amount. Leave out what the receipt "
  .. "does not show."

-- Equal as the receipt means them: numbers to the cent, strings without
-- case and spacing.
local function same(a, b)
  if type(a) == "number" and type(b) == "number" then return math.abs(a - b) < 0.005 end
  if type(a) == "string" and type(b) == "string" then
    local function n(s) return (s:lower():gsub("%s+", " "):gsub("^ ", ""):gsub(" $", "")) end
    return n(a) == n(b)
  end
  return a == b
end

local function show(v)
  if v == nil then return "-" end
  if type(v) == "number" then return (("%.2f"):format(v):gsub("%.00$", "")) end
  return tostring(v)
end

local function run_job(b, argv)
  local slm = require "slm"
  local json = require "slm.json"
  local core = require "slm.core"
  local o = backend.parse_args(argv, { sim = "string" })
  local report = {}
  local function say(s) report[#report + 1] = (s or "") .. "\n" end

  local image = o.args[1] or (script_dir .. "/data/receipt.png")
  local expected = json.decode(backend.read_file(o.args[2] or (script_dir .. "/data/receipt_expected.json")))
  -- a model that reads images, or gpt-4o-mini behind one that does not
  local fallback = b.model ~= "gpt-4o-mini" and { "gpt-4o-mini" } or { HERMES }
  local client = slm.client { base_url = b.base_url, api_key = b.api_key, model = b.model, fallback = fallback,
    timeout = 120, headers = backend.sim_headers(b, "receipt_extract", o.sim) }
  local w, h = require("slm.image").size(backend.read_file(image))
  say(("receipt_extract: %s (%sx%s PNG), schema of %d fields, model %s, fallback %s"):format(image, tostring(w),
    tostring(h), (function() local n = 0 for _ in pairs(SCHEMA.properties) do n = n + 1 end return n end)(),
    b.model, table.concat(fallback, ", ")))

  local started = core.now()
  local res, err = slm.extract { client = client, document = PROMPT, schema = SCHEMA, images = { image } }
  local wall = core.now() - started
  if not res then
    say(("extraction failed: %s"):format(tostring(err)))
    if type(err) == "table" and err.usage then
      say(backend.cost_line(b, err.cost or 0, err.usage.total_tokens))
    end
    return false, table.concat(report)
  end
  say(("read by %s in %d call%s%s; valid against the schema"):format(res.model, res.calls, res.calls > 1 and "s" or "",
    res.repaired > 0 and " (the reply was repaired once)" or ""))
  say()
  say("JSON:")
  say("  " .. json.encode(res.data))

  -- field by field
  local rows, right, total = {}, 0, 0
  local function compare(field, want, got)
    total = total + 1
    local ok = same(want, got)
    if ok then right = right + 1 end
    rows[#rows + 1] = { field = field, want = show(want), got = show(got), ok = ok and "yes" or "no" }
  end
  local keys = {}
  for k in pairs(expected) do if k ~= "items" then keys[#keys + 1] = k end end
  table.sort(keys)
  for _, k in ipairs(keys) do compare(k, expected[k], res.data[k]) end
  local got_items = res.data.items or {}
  for i, want in ipairs(expected.items) do
    local got = got_items[i] or {}
    for _, f in ipairs{ "name", "qty", "unit_price", "total" } do
      compare(("items[%d].%s"):format(i, f), want[f], got[f])
    end
  end
  if #got_items ~= #expected.items then
    compare("number of items", #expected.items, #got_items)
  end
  say()
  report[#report + 1] = tf.render({
    { key = "field", title = "field" },
    { key = "want", title = "receipt", max = 36 },
    { key = "got", title = "read", max = 36 },
    { key = "ok", title = "match" },
  }, rows)
  say()
  say(("matched:      %d of %d fields%s"):format(right, total,
    b.simulated and " (the simulator sees no image: its values are its own filling of the schema)" or ""))
  say(("tokens:       %s prompt + %s completion = %s"):format(fmt_count(res.usage.prompt_tokens),
    fmt_count(res.usage.completion_tokens), fmt_count(res.usage.total_tokens)))
  say(backend.cost_line(b, res.cost or 0, res.usage.total_tokens, res.model))
  say(("wall time:    %.2f s"):format(wall))
  return true, table.concat(report)
end

os.exit(backend.main("receipt_extract", USAGE, run_job, arg))
