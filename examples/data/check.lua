#!/usr/bin/env lua5.4
-- examples/data/check.lua: checks the bundled data sets.
--
--   lua5.4 examples/data/check.lua
--
-- Valid JSON on every line, unique ids, the field sets and enums, counts per
-- category/language/split, UTF-8 validity, a strict RFC 4180 parse of the
-- catalogue, the checksums of every fake card number (Luhn), IBAN (mod 97),
-- Russian INN and SNILS in the texts, the contract's length and planted
-- facts, and the receipt's PNG header and sums. Needs lua-cjson only.
-- Ends with "N passed, N failed"; exit status 1 when anything failed.

local cjson = require "cjson.safe"

local dir = (arg and arg[0] or ""):match("^(.*)[/\\]") or "."

local passed, failed = 0, 0
local function check(ok, what)
  if ok then
    passed = passed + 1
  else
    failed = failed + 1
    print("FAIL  " .. what)
  end
  return ok
end

local function read(name)
  local f, err = io.open(dir .. "/" .. name, "rb")
  if not f then return nil, err end
  local s = f:read("a")
  f:close()
  return s
end

local function lines(s)
  local out = {}
  for line in s:gmatch("([^\n]*)\n") do out[#out + 1] = line end
  local tail = s:match("[^\n]+$")
  if tail then out[#out + 1] = tail end
  return out
end

local function set_of(list)
  local s = {}
  for _, v in ipairs(list) do s[v] = true end
  return s
end

local function words(s)
  local n = 0
  for _ in s:gmatch("%S+") do n = n + 1 end
  return n
end

-- Lower-cases ASCII and Cyrillic (string.lower knows only ASCII).
local function lower(s)
  local out = {}
  for _, c in utf8.codes(s) do
    if c >= 0x41 and c <= 0x5A then c = c + 32
    elseif c >= 0x410 and c <= 0x42F then c = c + 32
    elseif c == 0x401 then c = 0x451 end
    out[#out + 1] = utf8.char(c)
  end
  return table.concat(out)
end

-- Checksums ---------------------------------------------------------------

local function luhn_ok(digits)
  local sum, alt = 0, false
  for i = #digits, 1, -1 do
    local d = tonumber(digits:sub(i, i))
    if alt then d = d * 2; if d > 9 then d = d - 9 end end
    sum = sum + d
    alt = not alt
  end
  return sum % 10 == 0
end

local IBAN_LENGTH = { DE = 22, NL = 18, LV = 21, FR = 27, LT = 20, EE = 20, FI = 18, IE = 22, IT = 27, ES = 24 }

local function iban_ok(iban)
  local s = iban:sub(5) .. iban:sub(1, 4)
  local rem = 0
  for ch in s:gmatch(".") do
    local v = ch:match("%d") and tonumber(ch) or (ch:byte() - 55)
    for digit in tostring(v):gmatch("%d") do rem = (rem * 10 + tonumber(digit)) % 97 end
  end
  return rem == 1
end

local function inn_ok(inn)
  local d = {}
  for c in inn:gmatch("%d") do d[#d + 1] = tonumber(c) end
  local function ctrl(weights)
    local s = 0
    for i, w in ipairs(weights) do s = s + w * d[i] end
    return s % 11 % 10
  end
  if #d == 10 then
    return ctrl({ 2, 4, 10, 3, 5, 9, 4, 6, 8 }) == d[10]
  elseif #d == 12 then
    return ctrl({ 7, 2, 4, 10, 3, 5, 9, 4, 6, 8 }) == d[11]
      and ctrl({ 3, 7, 2, 4, 10, 3, 5, 9, 4, 6, 8 }) == d[12]
  end
  return false
end

local function snils_ok(number, control)
  local s = 0
  for i = 1, 9 do s = s + tonumber(number:sub(i, i)) * (10 - i) end
  local c
  if s < 100 then c = s
  elseif s == 100 or s == 101 then c = 0
  else c = s % 101; if c == 100 then c = 0 end end
  return c == tonumber(control)
end

-- Finds the fake identifiers in a text and checks each one; returns how many
-- of each kind it saw.
local function check_identifiers(text, where, seen)
  -- card numbers: 16 digits (spaces or dashes allowed) starting 2, 4 or 5
  for run in text:gmatch("%d[%d %-]+%d") do
    local digits = run:gsub("[ %-]", "")
    if #digits == 16 and digits:match("^[245]") then
      seen.card = seen.card + 1
      check(luhn_ok(digits), ("%s: card number %s fails the Luhn check"):format(where, run))
    end
  end
  -- IBANs: country code, check digits, then groups of up to 4 or one block
  for start in text:gmatch("()%u%u%d%d") do
    if start == 1 or not text:sub(start - 1, start - 1):match("[%w]") then
      local rest = text:sub(start)
      local first = rest:match("^([%u%d]+)")
      local iban = first
      if #first == 4 then
        local pos = 5
        while true do
          local grp = rest:match("^ ([%u%d][%u%d]?[%u%d]?[%u%d]?)%f[^%u%d]", pos)
          if not grp then break end
          iban = iban .. grp
          pos = pos + 1 + #grp
        end
      end
      local cc = iban:sub(1, 2)
      if IBAN_LENGTH[cc] and #iban == IBAN_LENGTH[cc] then
        seen.iban = seen.iban + 1
        check(iban_ok(iban), ("%s: IBAN %s fails the mod-97 check"):format(where, iban))
      end
    end
  end
  for inn in text:gmatch("ИНН[%s:№]*(%d+)") do
    seen.inn = seen.inn + 1
    check(inn_ok(inn), ("%s: INN %s has wrong check digits"):format(where, inn))
  end
  for a, b, c, ctl in text:gmatch("(%d%d%d)%-(%d%d%d)%-(%d%d%d) (%d%d)") do
    seen.snils = seen.snils + 1
    check(snils_ok(a .. b .. c, ctl), ("%s: SNILS %s-%s-%s %s has a wrong check number"):format(where, a, b, c, ctl))
  end
end

local seen = { card = 0, iban = 0, inn = 0, snils = 0 }

-- support_tickets.jsonl ---------------------------------------------------

local LABELS = { "billing", "delivery", "technical", "account", "product_question",
  "complaint", "feature_request", "cancellation", "other" }
local TICKET_FIELDS = { "id", "lang", "subject", "body", "label", "priority", "escalate", "split", "notes" }
do
  local s = assert(read("support_tickets.jsonl"))
  check(utf8.len(s) ~= nil, "support_tickets.jsonl is not valid UTF-8")
  local ids, n = {}, 0
  local by_label, by_lang, by_split = {}, {}, {}
  local labels, prios = set_of(LABELS), set_of({ "urgent", "high", "medium", "low" })
  for i, line in ipairs(lines(s)) do
    local where = ("support_tickets.jsonl:%d"):format(i)
    local t = cjson.decode(line)
    if check(type(t) == "table", where .. ": not a JSON object") then
      n = n + 1
      local nkeys = 0
      for _ in pairs(t) do nkeys = nkeys + 1 end
      check(nkeys == #TICKET_FIELDS, where .. ": unexpected or missing fields")
      for _, k in ipairs(TICKET_FIELDS) do
        check(t[k] ~= nil, ("%s: field %s missing"):format(where, k))
      end
      check(type(t.id) == "string" and t.id:match("^T%-%d+$"), where .. ": bad id")
      check(not ids[t.id], where .. ": duplicate id " .. tostring(t.id))
      ids[t.id] = true
      check(t.lang == "ru" or t.lang == "en", where .. ": bad lang")
      check(labels[t.label], where .. ": bad label " .. tostring(t.label))
      check(prios[t.priority], where .. ": bad priority")
      check(type(t.escalate) == "boolean", where .. ": escalate is not a boolean")
      check(t.split == "dev" or t.split == "test", where .. ": bad split")
      check(type(t.subject) == "string", where .. ": subject is not a string")
      check(type(t.body) == "string" and t.body:find("%S"), where .. ": empty body")
      check(type(t.notes) == "string" and t.notes:find("%S"), where .. ": empty notes")
      if t.lang == "ru" and type(t.body) == "string" then
        check(t.body:find("[\208\209]") ~= nil, where .. ": lang ru but no Cyrillic in the body")
      end
      by_label[t.label] = (by_label[t.label] or 0) + 1
      by_lang[t.lang] = (by_lang[t.lang] or 0) + 1
      by_split[t.split] = (by_split[t.split] or 0) + 1
      check_identifiers((t.subject or "") .. "\n" .. (t.body or ""), t.id, seen)
    end
  end
  check(n >= 240, ("support_tickets.jsonl: %d tickets, want at least 240"):format(n))
  for _, l in ipairs(LABELS) do
    local want = l == "other" and 10 or 15
    check((by_label[l] or 0) >= want, ("support_tickets.jsonl: %s has %d tickets, want %d"):format(l, by_label[l] or 0, want))
  end
  local ru, en = by_lang.ru or 0, by_lang.en or 0
  check(math.abs(ru - en) <= n * 0.1, ("support_tickets.jsonl: ru %d vs en %d is not about half and half"):format(ru, en))
  local dev = (by_split.dev or 0) / n
  check(dev > 0.2 and dev < 0.3, ("support_tickets.jsonl: dev share %.2f, want about 0.25"):format(dev))
  local parts = {}
  for _, l in ipairs(LABELS) do parts[#parts + 1] = ("%s %d"):format(l, by_label[l] or 0) end
  print(("tickets:    %d (ru %d, en %d; dev %d, test %d): %s"):format(n, ru, en,
    by_split.dev or 0, by_split.test or 0, table.concat(parts, ", ")))
end

-- kb/faq.jsonl, kb/policies.md ---------------------------------------------

do
  local s = assert(read("kb/faq.jsonl"))
  check(utf8.len(s) ~= nil, "kb/faq.jsonl is not valid UTF-8")
  local entries, by_id, langs = {}, {}, {}
  for i, line in ipairs(lines(s)) do
    local where = ("kb/faq.jsonl:%d"):format(i)
    local e = cjson.decode(line)
    if check(type(e) == "table", where .. ": not a JSON object") then
      entries[#entries + 1] = e
      check(type(e.id) == "string" and e.id:match("^faq%-[%w]+%-%d+$"), where .. ": bad id")
      check(not by_id[e.id], where .. ": duplicate id " .. tostring(e.id))
      by_id[e.id] = e
      check(e.lang == "ru" or e.lang == "en", where .. ": bad lang")
      check(type(e.title) == "string" and e.title:find("%S"), where .. ": empty title")
      check(type(e.text) == "string" and #e.text > 80, where .. ": text missing or too short")
      langs[e.lang] = (langs[e.lang] or 0) + 1
      check_identifiers(e.text or "", e.id or where, seen)
    end
  end
  local pairs_n = 0
  for _, e in ipairs(entries) do
    if e.translation ~= nil then
      local t = by_id[e.translation]
      check(t and t.translation == e.id and t.lang ~= e.lang, e.id .. ": translation link is not mutual")
      pairs_n = pairs_n + 1
    end
  end
  check(#entries >= 40, ("kb/faq.jsonl: %d entries, want at least 40"):format(#entries))
  check((langs.ru or 0) > 0 and (langs.en or 0) > 0, "kb/faq.jsonl: needs both languages")
  check(pairs_n > 0 and pairs_n < #entries, "kb/faq.jsonl: want some entries in both languages and some in one")
  local inj = by_id["faq-tips-1"]
  check(inj and lower(inj.text):find("ignore all previous instructions", 1, true),
    "kb/faq.jsonl: the prompt-injection passage faq-tips-1 is missing")
  -- the same facts everywhere: the return window is 30 days in every entry that names one
  for _, e in ipairs(entries) do
    local t = lower(e.title .. " " .. e.text)
    if t:find("return", 1, true) or t:find("возврат", 1, true) then
      for n in t:gmatch("(%d+)[ -]*day return") do check(n == "30", e.id .. ": return window is not 30 days") end
      for n in t:gmatch("в течение (%d+) дней с момента получения") do check(n == "30", e.id .. ": return window is not 30 days") end
    end
  end
  print(("faq:        %d entries (ru %d, en %d; %d with a translation); injection entry faq-tips-1")
    :format(#entries, langs.ru or 0, langs.en or 0, pairs_n))

  local p = assert(read("kb/policies.md"))
  check(utf8.len(p) ~= nil, "kb/policies.md is not valid UTF-8")
  local w = words(p)
  check(w >= 1000 and w <= 3000, ("kb/policies.md: %d words, want a 2-3 page document"):format(w))
  check(p:find("30 days of the delivery date", 1, true), "kb/policies.md: 30-day return window not stated")
  print(("policies:   %d words"):format(w))
end

-- catalogue.csv: strict RFC 4180 ------------------------------------------

-- Strict reader: CRLF between records, fields either plain (no quote, comma,
-- CR or LF) or quoted with "" for a quote; nothing after a closing quote but
-- a comma or the record end. Returns records or nil, error.
local function rfc4180(s)
  local records, rec, pos, len = {}, {}, 1, #s
  if len == 0 then return records end
  while true do
    local field
    if s:sub(pos, pos) == '"' then
      local buf = {}
      pos = pos + 1
      while true do
        local q = s:find('"', pos, true)
        if not q then return nil, "unterminated quoted field in record " .. (#records + 1) end
        buf[#buf + 1] = s:sub(pos, q - 1)
        if s:sub(q + 1, q + 1) == '"' then
          buf[#buf + 1] = '"'
          pos = q + 2
        else
          pos = q + 1
          break
        end
      end
      field = table.concat(buf)
    else
      local e = s:find('[,\r\n"]', pos) or len + 1
      if s:sub(e, e) == '"' then return nil, "quote inside an unquoted field in record " .. (#records + 1) end
      field = s:sub(pos, e - 1)
      pos = e
    end
    rec[#rec + 1] = field
    local c = s:sub(pos, pos)
    if c == "," then
      pos = pos + 1
    elseif c == "\r" and s:sub(pos + 1, pos + 1) == "\n" then
      records[#records + 1] = rec
      rec = {}
      pos = pos + 2
      if pos > len then return records end
    elseif pos > len then
      records[#records + 1] = rec
      return records
    else
      return nil, ("bad character %q after a field in record %d"):format(c, #records + 1)
    end
  end
end

do
  local s = assert(read("catalogue.csv"))
  check(utf8.len(s) ~= nil, "catalogue.csv is not valid UTF-8")
  check(s:sub(1, 3) ~= "\239\187\191", "catalogue.csv starts with a BOM")
  local recs, err = rfc4180(s)
  if check(recs ~= nil, "catalogue.csv: " .. tostring(err)) then
    local header = table.concat(recs[1], ",")
    check(header == "sku,name,category,price_rub,price_eur,features,audience,lang", "catalogue.csv: header is " .. header)
    local brand = cjson.decode(assert(read("brand.json")))
    local skus, keys, nsku, by_lang = {}, {}, 0, {}
    for i = 2, #recs do
      local r = recs[i]
      local where = ("catalogue.csv record %d"):format(i)
      if check(#r == 8, where .. ": " .. #r .. " fields") then
        local sku, name, cat, rub, eur, feat, aud, lang = table.unpack(r)
        check(sku:match("^%u%u%u?%-%d%d%d%d$"), where .. ": bad sku " .. sku)
        check(not keys[sku .. "/" .. lang], where .. ": duplicate sku+lang " .. sku .. "/" .. lang)
        keys[sku .. "/" .. lang] = true
        if not skus[sku] then skus[sku] = { rub = rub, eur = eur, cat = cat }; nsku = nsku + 1
        else
          check(skus[sku].rub == rub and skus[sku].eur == eur and skus[sku].cat == cat,
            where .. ": " .. sku .. " has different prices or category per language")
        end
        check(rub:match("^%d+$"), where .. ": price_rub is not an integer")
        check(eur:match("^%d+%.%d%d$"), where .. ": price_eur is not a decimal with 2 places")
        check(lang == "ru" or lang == "en", where .. ": bad lang")
        check(feat:find("; ", 1, true), where .. ": features are not '; '-separated")
        check(name ~= "" and aud ~= "" and cat ~= "", where .. ": empty field")
        by_lang[lang] = (by_lang[lang] or 0) + 1
        local text = lower(name .. " " .. feat .. " " .. aud)
        for _, b in ipairs(brand and brand.banned or {}) do
          check(not text:find(lower(b), 1, true), where .. ": contains the banned word " .. b)
        end
      end
    end
    check(nsku >= 25, ("catalogue.csv: %d products, want at least 25"):format(nsku))
    print(("catalogue:  %d products in %d rows (en %d, ru %d)"):format(nsku, #recs - 1, by_lang.en or 0, by_lang.ru or 0))
  end
end

-- brand.json --------------------------------------------------------------

do
  local raw = assert(read("brand.json"))
  check(utf8.len(raw) ~= nil, "brand.json is not valid UTF-8")
  local b = cjson.decode(raw)
  if check(type(b) == "table", "brand.json is not a JSON object") then
    for _, k in ipairs({ "name", "tone", "audience" }) do
      check(type(b[k]) == "string" and b[k] ~= "", "brand.json: " .. k .. " missing")
    end
    for _, k in ipairs({ "do", "dont", "banned" }) do
      check(type(b[k]) == "table" and #b[k] > 0, "brand.json: " .. k .. " missing or empty")
    end
    local hasru, hasen = false, false
    for _, w in ipairs(b.banned or {}) do
      if w:find("[\208\209]") then hasru = true else hasen = true end
    end
    check(hasru and hasen, "brand.json: banned words need both languages")
  end
end

-- contract.txt, contract_expected.json -------------------------------------

do
  local c = assert(read("contract.txt"))
  check(utf8.len(c) ~= nil, "contract.txt is not valid UTF-8")
  local w = words(c)
  check(w >= 9000 and w <= 14000, ("contract.txt: %d words, want 9,000-14,000"):format(w))
  local e = cjson.decode(assert(read("contract_expected.json")))
  if check(type(e) == "table", "contract_expected.json is not a JSON object") then
    local function count(needle)
      local n, pos = 0, 1
      while true do
        local a, b = c:find(needle, pos, true)
        if not a then return n end
        n, pos = n + 1, b + 1
      end
    end
    for _, p in ipairs(e.parties) do
      check(count(p.name) >= 3, "contract.txt: party name " .. p.name .. " appears fewer than 3 times")
      check(count(p.registration_number) >= 1, "contract.txt: registration number of " .. p.name .. " missing")
    end
    for _, s in ipairs(e.signatories) do
      check(count(s.name) >= 1, "contract.txt: signatory " .. s.name .. " missing")
    end
    check(count(e.liability_cap.text) >= 3, "contract.txt: liability cap text appears fewer than 3 times")
    check(#e.conflicts == 1, "contract_expected.json: want exactly one conflict")
    for _, v in ipairs(e.conflicts[1].values) do
      check(count(v.text) == 1, "contract.txt: conflicting text not found exactly once: " .. v.text)
    end
    check(count("days of the date of the invoice") + count("days of the invoice date") == 2,
      "contract.txt: more than the two planted payment-term statements")
    check(count(e.governing_law) >= 1, "contract.txt: governing law missing")
    check(iban_ok(e.bank_account.iban), "contract_expected.json: IBAN fails mod 97")
    check_identifiers(c, "contract.txt", seen)
  end
  print(("contract:   %d words; planted conflict: payment term 30 days (clause 7.2) vs 45 days (Annex B 4.2)"):format(w))
end

-- receipt.png, receipt.txt, receipt_expected.json ---------------------------

do
  local png = assert(read("receipt.png"))
  check(png:sub(1, 8) == "\137PNG\r\n\26\n", "receipt.png: not a PNG signature")
  check(png:sub(13, 16) == "IHDR", "receipt.png: first chunk is not IHDR")
  local wpx, hpx = string.unpack(">I4>I4", png, 17)
  check(wpx >= 400 and wpx <= 1200 and hpx >= 600 and hpx <= 1600, ("receipt.png: odd size %dx%d"):format(wpx, hpx))
  check(#png < 150 * 1024, ("receipt.png: %d bytes, want < 150 KB"):format(#png))
  local txt = assert(read("receipt.txt"))
  check(utf8.len(txt) ~= nil, "receipt.txt is not valid UTF-8")
  local r = cjson.decode(assert(read("receipt_expected.json")))
  if check(type(r) == "table", "receipt_expected.json is not a JSON object") then
    local sum = 0
    for _, it in ipairs(r.items) do
      check(math.abs(it.qty * it.unit_price - it.total) < 0.005, "receipt_expected.json: " .. it.name .. " qty x price ~= total")
      check(txt:find(it.name, 1, true), "receipt.txt: item " .. it.name .. " missing")
      sum = sum + it.total
    end
    check(#r.items >= 5 and #r.items <= 8, "receipt_expected.json: want 5-8 items")
    check(math.abs(sum - r.subtotal) < 0.005, "receipt_expected.json: items do not add up to the subtotal")
    check(math.abs(r.subtotal - (r.discount or 0) - r.total) < 0.005, "receipt_expected.json: subtotal - discount ~= total")
    check(math.abs(r.total * r.vat_rate / (100 + r.vat_rate) - r.vat) < 0.006, "receipt_expected.json: VAT is not the included VAT of the total")
    check(math.abs(r.total - r.vat - r.net_amount) < 0.005, "receipt_expected.json: net amount ~= total - VAT")
    check(txt:find(("%.2f"):format(r.total), 1, true), "receipt.txt: total missing")
    check(txt:find("**** " .. r.card_last4, 1, true), "receipt.txt: masked card missing")
    check(r.currency == "EUR" and r.merchant and r.date and r.payment_method, "receipt_expected.json: missing fields")
    print(("receipt:    %dx%d PNG, %d bytes, %d items, total %.2f %s"):format(wpx, hpx, #png, #r.items, r.total, r.currency))
  end
end

print(("identifiers checked: %d card numbers (Luhn), %d IBANs (mod 97), %d INNs, %d SNILS")
  :format(seen.card, seen.iban, seen.inn, seen.snils))
check(seen.card >= 3 and seen.iban >= 2 and seen.inn >= 3 and seen.snils >= 1,
  "want at least 3 card numbers, 2 IBANs, 3 INNs and 1 SNILS in the texts")

print(("%d passed, %d failed"):format(passed, failed))
os.exit(failed == 0 and 0 or 1)
