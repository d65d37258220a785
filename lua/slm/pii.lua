-- slm.pii: personal data (152-FZ, GDPR) replaced by placeholders before a
-- text leaves the machine, and put back into what the model answers.
--
--   local pii = require "slm.pii"
--   local m = pii.new{ kinds = { "email", "phone" } }  -- default: every kind
--   m:mask(text)              -> text with each value as "[EMAIL_1]", "[PHONE_2]", ...
--   m:unmask(reply)           -> reply with this masker's placeholders put back
--   m.counts                  -> { email = 1, phone = 2, ... } distinct values so far
--   m:mask_messages(messages) -> a new list of chat messages, masked
--   m:unmask_value(v)         -> a deep copy of a decoded JSON value, unmasked
--   m:unmasker()              -> feed(piece) -> text ready, unmasked; feed(nil) -> the rest
--   pii.detect(text [, kinds]) -> { { kind =, value =, start =, stop = }, ... }
--   pii.check.luhn/iban/inn/snils(s) -> bool: the checksums on their own
--
-- Pure Lua, the same under Lua 5.4 and LuaJIT: checksums work on digit
-- strings (mod 97 in 7-digit pieces), no integer-only operators. Two
-- passes over a text whatever the kinds: a plain find of "@" for e-mail,
-- and one over the groups of digits that serves every numeric kind and
-- IBANs (a group right after two capital letters); mask adds plain finds
-- of the kind names, for placeholders already in the text. Every value
-- starts and ends on an ASCII character, so a replacement never cuts a
-- UTF-8 character; letters of other scripts (bytes >= 0x80) count as word
-- boundaries.
--
-- Placeholders: "[" KIND "_" N "]", KIND one of EMAIL PHONE CARD IBAN INN
-- SNILS PASSPORT, N counting from 1 per kind and per masker. The same value
-- (normalized: e-mail lowercased, phone/card/INN/SNILS/passport digits only,
-- IBAN without spaces) always gets the same placeholder in one masker;
-- different values get different numbers. Phone normalization: a Russian
-- national "8 ..." number is the same as "+7 ...", and a trunk "(0)" after
-- the country code is dropped ("+44 (0) 20 ..." is "+44 20 ..."), and a
-- number without a country code ("(495) 123-45-67") is never the same as a
-- "+" one of the same digits ("+49 5123 4567"); so
-- "+7 (912) 345-67-89" and "89123456789" share one placeholder, and unmask
-- writes the form seen first.
--
-- unmask puts back, for the numbers this masker issued: "[EMAIL_1]" as
-- issued; inside brackets, any case and "_", " " or "-" ("[email 1]",
-- "[Email-1]"); and bare "EMAIL_1" (upper case, "_", not part of a longer
-- word: "xEMAIL_1" and "EMAIL_1x" stay). Numbers it never issued, and
-- anything else, stay as they are. A placeholder-shaped string that is
-- already in a text given to mask ("[EMAIL_3]" in a template) reserves that
-- number, which is never issued, so unmask leaves it alone; one that shows
-- up only after that number was issued is taken as the placeholder. The
-- values put back never contain a character JSON escapes, so unmask works
-- on raw JSON text (tool call arguments) as well.
--
-- mask_messages copies each message and masks a string content, the text
-- of each { type = "text" } part, and the arguments of tool_calls (and of
-- the older function_call); roles, names, tool_call_id, tool call ids and
-- function names, image/audio/other parts (the same tables) and any other
-- field stay as they were (a name must match ^[%w_-]+$ at OpenAI, where a
-- placeholder could not go: keep personal data out of names). Metatables
-- (slm.json's array marks) are kept. A value cut between the texts of a
-- message, or of consecutive messages of one role, is masked as the model
-- reads them joined (mask_joined, below). unmask_value copies tables (shared
-- ones once, cycles too), unmasks every string, keys included, and keeps
-- numbers, booleans, json.null and metatables.
--
-- What is detected (all ASCII; the rules in full):
--
-- email: local@domain. Local part 1-64 of A-Z a-z 0-9 . _ % + - (no leading,
--   trailing or double dot); domain two or more labels of A-Z a-z 0-9 -
--   (1-63 each, no hyphen at either end, 253 in all), the last all letters
--   (2-63) or "xn--..."; trailing dots/hyphens are left out ("mail me at
--   a@b.ru."). Not an e-mail: anything with "@" just before the local part
--   or just after the domain ("a@b.ru@c.ru"); inside a URL (a run of
--   the bytes URLs hold, holding "://" before it: a quote, "<", ">", white
--   space... end a URL, and so do a ")" or "]" closing none opened in it,
--   a "'" after "'https://...", and ")", "]", "'" right before the
--   address: "[site](https://x.org/a)a@b.ru" is masked) the userinfo
--   ("https://user@host/") and the path ("https://x.org/u/a@b.ru") are left
--   alone, while the query and fragment ("?to=a@b.ru") are masked.
-- phone (10-15 digits; separators between digit groups " ", no-break
--   space, "-", "."; one group may stand in parentheses; "+", "(" and ")"
--   are part of the value):
--   - "+" and the number: the total digit count must fit the country's
--     (pii.phone_lengths, by the 1-3 digit country code: +7 and +1 exactly
--     11, +44 11-12, ...; other codes 10-15): "+7 912 345-67-89",
--     "+44 20 7946 0958", "+1 (415) 555-0100", "+79123456789".
--   - Russian national: 11 digits starting with 8, the next one 3, 4, 7, 8
--     or 9, the first group "8", "8XXX" or all 11 digits, parentheses only
--     around the group after the 8: "8 (912) 345-67-89", "8-800-555-35-35",
--     "89123456789".
--   - A parenthesized 3-5 digit area code (not starting with 0 or 1) and 10
--     digits in all: "(495) 123-45-67".
--   Not masked: shorter numbers ("123-45-67"), numbers without "+", 8 or a
--   parenthesized code, and groups joined by other characters.
-- card: 13-19 digits starting with 2-6 (Mir, Visa, Mastercard, Amex,
--   Discover, UnionPay...) and passing the Luhn check: groups of 4 (the
--   last 1-4) joined all by spaces or all by dashes, 4-6-5 / 4-6-4 (Amex,
--   Diners), or one group of 14-19 (not 13: one-piece 13 digits starting
--   with 4 are EAN-13 barcodes, "4607001234531", far more often than an old
--   Visa).
-- iban: two upper-case letters, two check digits (02-98), then upper-case
--   letters and digits, 15-34 in all, valid by ISO 7064 mod 97-10: written
--   in one piece, or in groups of 4 (the last 1-4) joined by single spaces.
-- inn: one group of 10 digits (legal entity: one check digit) or 12 (a
--   person: two), with the published weights; not starting with "00".
--   "ИНН/КПП 5001007329/500101001": the INN is found, the KPP is not.
-- snils: 11 digits, "XXX-XXX-XXX YY" (spaces or dashes in any of the three
--   places, the first two alike) or in one group. The check: the first nine
--   digits weighted 9..1, the sum below 100 is the check number, 100 and
--   101 give 00, above that the sum mod 101 (100 giving 00). Numbers up to
--   001-001-998 were issued before the check existed: the formatted form is
--   taken without it, the one-group form not at all.
-- passport (Russian, series 4 + number 6 digits; series not "00", number
--   not "000000"):
--   - "45 11 123456" (2-2-6 with spaces): always.
--   - series and number with a number sign between ("4511 № 123456",
--     "45 11 №123456", "4511 N 123456", "4511 номер 123456"): always.
--   - "4511 123456" and "4511123456": only after a context word ("паспорт",
--     "серия"/"серии" in three cases, "passport" in any case) at most 64
--     bytes before, with no digit between the word and the series. A "№"
--     before the whole number does not count ("заказ № 4511123456" is an
--     order number).
--
-- Boundaries, for every numeric kind: the value is not part of a longer
-- word or number. Before it: no letter, digit, "_", "@" or "+" (only a
--   phone starts with "+"); no ".", ",", "-" or "/" right after a letter or
--   digit; no ":" after a digit; no space after a digit ("2024 8 912 ...");
--   a phone also not after "#" or "№", with or without a space; a phone
--   that starts with "+" only the first of these ("+" continues no number:
--   "+7 912 345-67-89,+7 912 345-67-88" is two phones). After it:
--   no letter, digit, "_" or "@"; no ".", ",", ":", "-" or "/" followed by
--   a digit ("/" is fine after an INN, for the KPP); no space followed by a
--   digit, except after a phone ("+7 912 345-67-89 10 шт." masks the
--   phone) and unless the number has as many digits as the value's last
--   group (it could be one more of them): "4000 0123 4567 8905 12/29" is
--   the card and its expiry, "ИНН/КПП 7707083893 770701001" the INN and
--   the KPP, but "4070 2810 9000 0012 3456" holds no card. A space between digits is fine where the digits on both sides
--   are values ("89123456789 4000 0123 4567 8905": a phone, then a card),
--   not where one side is not ("2024 4000012345678905"). So
--   dates ("2024-05-17"), times ("12:30"), prices ("1 299,00 руб."), order
--   and invoice numbers ("order #58213", "INV-20931") are never values,
--   and neither is a piece of a longer grouped number.
--
-- Overlaps: the kinds rank email, iban, card, passport, snils, inn, phone
-- (distinctive and checksummed first). The numeric kinds work on whole
-- digit groups, so a 12-digit INN is never found inside a 16-digit card
-- number, nor a card inside a longer run of 4-digit groups (a 20-digit
-- account number). Among groups joined by separators, values are taken
-- from the left, at each group the first kind in rank order that has a
-- value starting there, its longest ("89123456726" passes the SNILS check:
-- a SNILS, not a phone; "паспорт 5001007329": a passport, not an INN).
-- Then e-mails, IBANs and numbers are ordered by where they start, and of
-- two that overlap the higher kind wins (an IBAN over the card-like digits
-- inside it), or of one kind the longer.
local type, pairs, ipairs, error, tostring, tonumber, setmetatable, getmetatable, next =
  type, pairs, ipairs, error, tostring, tonumber, setmetatable, getmetatable, next
local find, sub, byte, gsub, gmatch, match, lower, upper =
  string.find, string.sub, string.byte, string.gsub, string.gmatch, string.match,
  string.lower, string.upper
local concat, sort = table.concat, table.sort

local M = {}

M.KINDS = { "email", "phone", "card", "iban", "inn", "snils", "passport" }
local LABEL = { email = "EMAIL", phone = "PHONE", card = "CARD", iban = "IBAN",
  inn = "INN", snils = "SNILS", passport = "PASSPORT" }
local KIND_OF = {} -- "EMAIL" -> "email"
for k, v in pairs(LABEL) do KIND_OF[v] = k end
-- who wins an overlap: the lower rank
local RANK = { email = 1, iban = 2, card = 3, passport = 4, snils = 5, inn = 6, phone = 7 }
-- the numeric kinds in rank order, with the digits and groups a value spans
local NUMERIC = { "card", "passport", "snils", "inn", "phone" }
local MIN_DIGITS = { card = 13, passport = 10, snils = 11, inn = 10, phone = 10 }
local MAX_DIGITS = { card = 19, passport = 10, snils = 11, inn = 12, phone = 15 }
local MAX_GROUPS = { card = 5, passport = 3, snils = 4, inn = 1, phone = 7 }

--- Total digits (country code included) of phone numbers by country code,
--- { min, max }; codes not listed take 10-15. Users may add to it.
M.phone_lengths = {
  ["1"] = { 11, 11 }, ["7"] = { 11, 11 }, ["33"] = { 11, 11 }, ["34"] = { 11, 11 },
  ["44"] = { 11, 12 }, ["48"] = { 11, 11 }, ["86"] = { 12, 13 }, ["90"] = { 12, 12 },
  ["91"] = { 12, 12 }, ["370"] = { 11, 11 }, ["371"] = { 11, 11 }, ["373"] = { 11, 11 },
  ["374"] = { 11, 11 }, ["375"] = { 12, 12 }, ["380"] = { 12, 12 }, ["992"] = { 12, 12 },
  ["993"] = { 11, 11 }, ["994"] = { 12, 12 }, ["995"] = { 12, 12 }, ["996"] = { 12, 12 },
  ["998"] = { 12, 12 },
}

--- Words that make "4511 123456" and "4511123456" a passport (plain find,
--- case as written; the window is lowercased too, for the Latin ones).
M.passport_words = { "паспорт", "Паспорт", "ПАСПОРТ", "серия", "Серия", "СЕРИЯ",
  "серии", "Серии", "СЕРИИ", "passport" }

-- Byte classes ----------------------------------------------------------

local DIGIT, UPPER, WORD = {}, {}, {} -- WORD: ASCII letters, digits, "_"
for b = 48, 57 do DIGIT[b] = true; WORD[b] = true end
for b = 65, 90 do UPPER[b] = true; WORD[b] = true; WORD[b + 32] = true end
WORD[95] = true

local SPACE, NBSP1, NBSP2 = 32, 194, 160
local AT, PLUS, HASH, LPAREN, DOT, COMMA, DASH, SLASH, COLON = 64, 43, 35, 40, 46, 44, 45, 47, 58

-- Checksums on digit strings ---------------------------------------------

local function luhn(d)
  local sum, dbl = 0, false
  for i = #d, 1, -1 do
    local x = byte(d, i) - 48
    if dbl then
      x = x * 2
      if x > 9 then x = x - 9 end
    end
    sum = sum + x
    dbl = not dbl
  end
  return sum % 10 == 0
end

local POW10 = { 10, 100, 1000, 10000, 100000, 1000000, 10000000 }
local LETTER_DIGITS = {} -- "A" -> "10" ... "Z" -> "35"
for b = 65, 90 do LETTER_DIGITS[string.char(b)] = tostring(b - 55) end

-- The remainder of a long decimal string by 97, seven digits at a time
-- (97 * 10^7 + 10^7 stays far below 2^53).
local function mod97(d)
  local r = 0
  for i = 1, #d, 7 do
    local piece = sub(d, i, i + 6)
    r = (r * POW10[#piece] + tonumber(piece)) % 97
  end
  return r
end

local function iban_ok(s)
  local n = #s
  if n < 15 or n > 34 or not find(s, "^%u%u%d%d[%u%d]+$") then return false end
  local check = tonumber(sub(s, 3, 4))
  if check < 2 or check > 98 then return false end
  return mod97((gsub(sub(s, 5) .. sub(s, 1, 4), "%u", LETTER_DIGITS))) == 1
end

local W10 = { 2, 4, 10, 3, 5, 9, 4, 6, 8 }
local W11 = { 7, 2, 4, 10, 3, 5, 9, 4, 6, 8 }
local W12 = { 3, 7, 2, 4, 10, 3, 5, 9, 4, 6, 8 }

-- Does digit n+1 of d check the first n with weights w?
local function inn_digit(d, w, n)
  local sum = 0
  for i = 1, n do sum = sum + (byte(d, i) - 48) * w[i] end
  return sum % 11 % 10 == byte(d, n + 1) - 48
end

local function inn_ok(d)
  if not find(d, "^%d+$") then return false end
  if #d == 10 then return inn_digit(d, W10, 9) end
  if #d == 12 then return inn_digit(d, W11, 10) and inn_digit(d, W12, 11) end
  return false
end

-- formatted: written "XXX-XXX-XXX YY", which vouches for the old numbers
-- that have no check.
local function snils_ok(d, formatted)
  if #d ~= 11 or not find(d, "^%d+$") then return false end
  local num = tonumber(sub(d, 1, 9))
  if num <= 1001998 then return formatted == true and num > 0 end
  local sum = 0
  for i = 1, 9 do sum = sum + (byte(d, i) - 48) * (10 - i) end
  local c
  if sum < 100 then c = sum
  elseif sum <= 101 then c = 0
  else
    c = sum % 101
    if c == 100 then c = 0 end
  end
  return c == tonumber(sub(d, 10, 11))
end

M.check = {
  luhn = function(d) return type(d) == "string" and find(d, "^%d+$") ~= nil and luhn(d) end,
  iban = function(s) return type(s) == "string" and iban_ok((gsub(upper(s), " ", ""))) end,
  inn = function(d) return type(d) == "string" and inn_ok(d) end,
  snils = function(d, formatted)
    if type(d) ~= "string" then return false end
    local plain = gsub(d, "[ %-]", "")
    return snils_ok(plain, formatted or plain ~= d)
  end,
}

-- Boundaries -------------------------------------------------------------

-- Where two messages meet in one of mask_joined's readings of a chain,
-- the model reads a line break: BREAK[p] when one stands before byte p
-- (a value may start at p, or end just before it, whatever the bytes on
-- the other side: "58213" then "4000 0123 4567 8905" is a card). Set by
-- find_all on each call: empty but for those readings.
local NO_BREAK = {}
local BREAK = NO_BREAK

-- May a value start at byte p? relaxed: the digits before a space there
-- are another value already, so the space parts two values.
local function left_ok(text, p, kind, relaxed)
  if p <= 1 or BREAK[p] then return true end
  local c = byte(text, p - 1)
  if WORD[c] or c == AT or c == PLUS then return false end
  if kind == "phone" then -- "#" or "№" (a space between allowed) numbers something else
    local b = c == SPACE and p - 2 or p - 1
    local x = b >= 1 and byte(text, b) or nil
    if x == HASH or (x == 150 and b > 2 and byte(text, b - 1) == 132 and byte(text, b - 2) == 226) then
      return false
    end
  end
  -- a "+" continues no number: "+7 912 345-67-89,+7 912 345-67-88" is two
  if byte(text, p) == PLUS then return true end
  local c2 = p > 2 and byte(text, p - 2) or nil
  if c == SPACE or (c == NBSP2 and c2 == NBSP1) then
    if c == NBSP2 then c2 = p > 3 and byte(text, p - 3) or nil end
    return relaxed or not (c2 and DIGIT[c2])
  end
  if c == DOT or c == COMMA or c == DASH or c == SLASH then return not (c2 and WORD[c2]) end
  if c == COLON then return not (c2 and DIGIT[c2]) end
  return true
end

-- May a value end just before byte q? (relaxed as for left_ok)
local function right_ok(text, q, kind, relaxed)
  local c = byte(text, q)
  if not c or BREAK[q] then return true end
  if WORD[c] or c == AT then return false end
  local c2 = byte(text, q + 1)
  if c == SPACE or (c == NBSP1 and c2 == NBSP2) then
    if kind == "phone" or relaxed then return true end
    local ds = c == NBSP1 and q + 2 or q + 1
    c2 = byte(text, ds)
    if not (c2 and DIGIT[c2]) then return true end
    -- a number of another length than the value's last group is no more
    -- of its groups: a card's expiry ("12/27") or CVV, the KPP after an
    -- INN, the date after a passport
    local _, de = find(text, "^%d+", ds)
    local b = q - 1 -- (a value's last group has at most 19 digits)
    while b > 0 and DIGIT[byte(text, b)] do b = b - 1 end
    return de - ds + 1 ~= q - 1 - b
  end
  if c == SLASH and kind == "inn" then return true end
  if c == DOT or c == COMMA or c == COLON or c == DASH or c == SLASH then
    return not (c2 and DIGIT[c2])
  end
  return true
end

-- E-mail -----------------------------------------------------------------

-- The bytes a URL may hold (RFC 3986's unreserved and reserved
-- characters and "%"; bytes >= 0x80 for IRIs), as a class: any other byte
-- (white space, a quote, "<", ">", "{", "}", "|", "\\", "^", "`", a
-- control character) ends a URL.
local URL_CLASS = "%w%-._~:/?#%[%]@!$&'()*+,;=%%\128-\255"
local URL_TAIL = "[^" .. URL_CLASS .. "][" .. URL_CLASS .. "]*$"

local QUOTE, RPAREN, LBRACKET, RBRACKET = 39, 41, 91, 93
local SCHEME = {} -- the bytes of a URL's scheme: letters, digits, "+", "-", "."
for b in pairs(WORD) do SCHEME[b] = true end
SCHEME[95], SCHEME[PLUS], SCHEME[DASH], SCHEME[DOT] = nil, true, true, true

-- Was the URL whose "://" is at u opened by a quote ("'https://...")?
local function quoted(text, u)
  local b = u - 1
  while b > 0 and u - b <= 32 and SCHEME[byte(text, b)] do b = b - 1 end
  return b > 0 and byte(text, b) == QUOTE
end

-- Is the e-mail whose local part starts at ls inside a URL's userinfo or
-- path (the run of URL bytes just before it holds "://")?  In
-- '{"url":"https://x.org/a","email":"a@b.ru"}' the quote ends the URL:
-- the e-mail is no part of it. A closing bracket or quote ends a URL
-- too: a ")" or "]" that closes none opened inside the URL (a Markdown
-- link "[site](https://x.org/a)a@b.ru", "(see https://x.org/a),a@b.ru";
-- "https://x.org/Foo_(bar)/a@b.ru" keeps its pair), a "'" when the URL
-- came right after one ("href='https://x.org/a'a@b.ru"), and any of
-- ")", "]", "'" right before the e-mail. st: the state of the scan over
-- the brackets, kept between the e-mails of one text (they come in
-- order), so a long URL is scanned once: key (the "://" of the run's
-- first URL), cur (that of the URL the scan is in, false after it ended),
-- at (the next byte to scan), after (where a next URL may start), dp, db
-- (the "(" and "[" open), q (opened by a quote).
local function in_url(text, ls, st)
  local c = byte(text, ls - 1)
  if c == RPAREN or c == RBRACKET or c == QUOTE then return false end
  local w0 = ls - 2048
  if w0 < 1 then w0 = 1 end
  local pre = sub(text, w0, ls - 1)
  if not find(pre, "://", 1, true) then return false end
  local k = find(pre, URL_TAIL)
  local u = find(pre, "://", k and k + 1 or 1, true)
  if not u then return false end
  u = w0 + u - 1
  local stop = ls - 1
  if st.key ~= u or st.at > ls then
    st.key, st.cur, st.at, st.after, st.dp, st.db, st.q = u, u, u + 3, u, 0, 0, quoted(text, u)
  end
  while st.at <= stop do
    if not st.cur then -- the URL ended: another one further on?
      local from = st.at - 2
      if from < st.after then from = st.after end
      local v = find(sub(text, from, stop), "://", 1, true)
      if not v then st.at = stop + 1; return false end
      v = from + v - 1
      st.cur, st.at, st.dp, st.db, st.q = v, v + 3, 0, 0, quoted(text, v)
    else
      local piece, base = sub(text, st.at, stop), st.at - 1
      local i = find(piece, "[%(%)%[%]']")
      local ended = false
      while i do
        local b = byte(piece, i)
        if b == 40 then st.dp = st.dp + 1
        elseif b == LBRACKET then st.db = st.db + 1
        elseif b == RPAREN then
          if st.dp == 0 then ended = true; break end
          st.dp = st.dp - 1
        elseif b == RBRACKET then
          if st.db == 0 then ended = true; break end
          st.db = st.db - 1
        elseif st.q then ended = true; break
        end
        i = find(piece, "[%(%)%[%]']", i + 1)
      end
      if ended then
        st.cur, st.at, st.after = false, base + i + 1, base + i + 1
      else
        st.at = stop + 1
      end
    end
  end
  if not st.cur then return false end
  local rest = sub(text, st.cur + 3, stop)
  local p = find(rest, "[/?#]")
  if not p then return true end                    -- userinfo@host
  if byte(rest, p) ~= SLASH then return false end  -- in the query or fragment
  return not find(rest, "[?#]", p + 1)             -- in the path
end

local function domain_ok(d)
  if #d > 253 then return false end
  local labels, last = 0, nil
  for label in gmatch(d .. ".", "([^.]*)%.") do
    local n = #label
    if n == 0 or n > 63 or byte(label, 1) == DASH or byte(label, n) == DASH then return false end
    labels, last = labels + 1, label
  end
  if labels < 2 then return false end
  return find(last, "^%a%a+$") ~= nil or find(last, "^xn%-%-[%w%-]+$") ~= nil
end

-- The e-mail with the local part from ls to the "@" at at and the
-- domain from ds to de (less trailing dots and hyphens), if it is one:
-- its first and last byte.
local function email_at(text, ls, at, ds, de, after, st)
  local lp = sub(text, ls, at - 1)
  local lead = match(lp, "^%.*")
  ls = ls + #lead
  lp = sub(lp, #lead + 1)
  -- trailing dots and hyphens left out (a loop: a pattern would take
  -- quadratic time over a long run of them)
  while de >= ds do
    local c = byte(text, de)
    if c ~= DOT and c ~= DASH then break end
    de = de - 1
  end
  if lp ~= "" and ls > after and byte(lp, #lp) ~= DOT and not find(lp, "..", 1, true)
      and (byte(text, ls - 1) ~= AT or BREAK[ls]) and (byte(text, de + 1) ~= AT or BREAK[de + 1])
      and domain_ok(sub(text, ds, de)) and not in_url(text, ls, st) then
    return ls, de
  end
  return nil
end

local function emails(text, out)
  local init, after = 1, 0 -- after: the end of the last e-mail found
  local st = { at = 0 }    -- in_url's scan
  while true do
    local at = find(text, "@", init, true)
    if not at then return end
    init = at + 1
    local lo = at - 65
    if lo < 1 then lo = 1 end
    local lp = match(sub(text, lo, at - 1), "[%w._%%+%-]+$")
    local ds, de = find(text, "^[%w.%-]+", at + 1)
    if lp and ds and #lp <= 64 then
      local ls = at - #lp
      local s, e = email_at(text, ls, at, ds, de, after, st)
      if not s and BREAK ~= NO_BREAK then
        -- two messages met inside: the address may start or end there
        -- ("x@" then "ivan@example.com", "ivan@example.com" then "2024")
        local starts, ends = { ls }, { de }
        for p = ls + 1, at - 1 do
          if BREAK[p] and #starts < 5 then starts[#starts + 1] = p end
        end
        for p = de < ds + 254 and de or ds + 254, ds + 1, -1 do -- (a domain has at most 253)
          if BREAK[p] then
            ends[#ends + 1] = p - 1
            if #ends == 5 then break end
          end
        end
        for a = 1, #starts do
          for b = 1, #ends do
            if a > 1 or b > 1 then s, e = email_at(text, starts[a], at, ds, ends[b], after, st) end
            if s then break end
          end
          if s then break end
        end
      end
      if s then
        out[#out + 1] = { kind = "email", s = s, e = e, key = lower(sub(text, s, e)) }
        after, init = e, e + 1
      end
    end
  end
end

-- IBAN -------------------------------------------------------------------

-- The IBAN whose country code starts at s, if one does.
local function iban_at(text, s)
  local _, b = find(text, "^[%u%d]+", s)
  if b - s + 1 < 4 then return nil end
  if b - s + 1 > 4 then -- one piece
    local v = sub(text, s, b)
    if not WORD[byte(text, b + 1) or 0] and byte(text, b + 1) ~= AT and iban_ok(v) then
      return { kind = "iban", s = s, e = b, key = v }
    end
    return nil
  end
  -- groups of 4: collect them, then the longest that checks
  local ends, parts, n, len = { b }, { sub(text, s, b) }, 1, 4
  local p = b + 1
  while byte(text, p) == SPACE and len < 34 do
    local x, y = find(text, "^[%u%d]+", p + 1)
    if not x or WORD[byte(text, y + 1) or 0] then break end
    local glen = y - x + 1
    if glen > 4 or len + glen > 34 then break end
    n, len = n + 1, len + glen
    ends[n], parts[n] = y, sub(text, x, y)
    p = y + 1
    if glen < 4 then break end
  end
  for k = n, 1, -1 do
    local v = concat(parts, "", 1, k)
    if #v < 15 then break end
    if byte(text, ends[k] + 1) ~= AT and not WORD[byte(text, ends[k] + 1) or 0] and iban_ok(v) then
      return { kind = "iban", s = s, e = ends[k], key = v }
    end
  end
  return nil
end

-- Numbers ----------------------------------------------------------------
-- One pass over the digit groups of the text; groups joined by a known
-- separator form a run, and each numeric kind looks for its values among
-- a run's consecutive groups (rs/re: first and last byte of each group,
-- rd: its digits, rg[t]: the class of the separator after group t).

local GAP = {
  [" "] = "sp", ["\194\160"] = "sp", ["-"] = "dash", ["."] = "dot",
  ["("] = "po", [" ("] = "po", ["\194\160("] = "po", ["-("] = "po",
  [")"] = "pc", [") "] = "pc", [")\194\160"] = "pc", [")-"] = "pc",
}

local GAP1 = {}
for g, c in pairs(GAP) do
  if #g == 1 then GAP1[byte(g)] = c end
end

-- Short gaps repeat (", ", " шт. "): what each was is remembered, up to 512.
local gap_seen, gap_seen_n = {}, 0
local function gap_class(gap)
  local c = GAP[gap]
  if c then return c end
  c = gap_seen[gap]
  if c == nil then
    c = (find(gap, "^[%s\194\160]*№[%s\194\160]*$") or find(gap, "^%s*[Nn][Oo]?%.?%s*$")
      or find(gap, "^%s*номер%s*$") or find(gap, "^%s*Номер%s*$")) and "no" or false
    if gap_seen_n >= 512 then gap_seen, gap_seen_n = {}, 0 end
    gap_seen[gap], gap_seen_n = c, gap_seen_n + 1
  end
  return c or nil
end

local function has_context(text, s)
  local w0 = s - 64
  if w0 < 1 then w0 = 1 end
  local w = sub(text, w0, s - 1)
  -- only what follows the last digit: no number between the word and the series
  local last = find(w, "%d[^%d]*$")
  if last then w = sub(w, last + 1) end
  local lw = lower(w)
  for _, word in ipairs(M.passport_words) do
    if find(w, word, 1, true) or find(lw, word, 1, true) then return true end
  end
  return false
end

local V = {} -- validators: (text, rs, re, rd, rg, i, j, nd) -> start, key | nil
-- (the boundaries around start .. re[j] are run's to check)

function V.card(text, rs, re, rd, rg, i, j, nd)
  local n = j - i + 1
  if n > 1 then
    local g = rg[i]
    if g ~= "sp" and g ~= "dash" then return nil end
    for t = i + 1, j - 1 do
      if rg[t] ~= g then return nil end
    end
    if n == 3 then
      if #rd[i] ~= 4 or #rd[i + 1] ~= 6 or (#rd[j] ~= 5 and #rd[j] ~= 4) then return nil end
    elseif n >= 4 then
      for t = i, j - 1 do
        if #rd[t] ~= 4 then return nil end
      end
      if #rd[j] > 4 then return nil end
    else
      return nil
    end
  end
  if n == 1 and nd == 13 then return nil end
  local d = n == 1 and rd[i] or concat(rd, "", i, j)
  local f = byte(d, 1)
  if f < 50 or f > 54 or not luhn(d) then return nil end -- 2-6
  return rs[i], d
end

function V.passport(text, rs, re, rd, rg, i, j, nd)
  local n, context = j - i + 1, false
  if n == 3 then
    if #rd[i] ~= 2 or #rd[i + 1] ~= 2 or rg[i] ~= "sp" then return nil end
    local g = rg[i + 1]
    if g ~= "sp" and g ~= "no" then return nil end
  elseif n == 2 then
    if #rd[i] ~= 4 then return nil end
    local g = rg[i]
    if g == "sp" then context = true elseif g ~= "no" then return nil end
  else
    context = true
  end
  if #rd[j] ~= 6 and n > 1 then return nil end
  local d = n == 1 and rd[i] or concat(rd, "", i, j)
  if sub(d, 1, 2) == "00" or sub(d, 5) == "000000" then return nil end
  if context and not has_context(text, rs[i]) then return nil end
  return rs[i], d
end

function V.snils(text, rs, re, rd, rg, i, j, nd)
  local n = j - i + 1
  if n == 4 then
    if #rd[i] ~= 3 or #rd[i + 1] ~= 3 or #rd[i + 2] ~= 3 then return nil end
    for t = i, j - 1 do
      if rg[t] ~= "sp" and rg[t] ~= "dash" then return nil end
    end
    if rg[i] ~= rg[i + 1] then return nil end
  elseif n ~= 1 then
    return nil
  end
  local d = n == 1 and rd[i] or concat(rd, "", i, j)
  if not snils_ok(d, n == 4) then return nil end
  return rs[i], d
end

function V.inn(text, rs, re, rd, rg, i, j, nd)
  local d = rd[i]
  if nd == 11 or sub(d, 1, 2) == "00" or not inn_ok(d) then return nil end
  return rs[i], d
end

local NATIONAL2 = { [51] = true, [52] = true, [55] = true, [56] = true, [57] = true } -- 3 4 7 8 9

local function country_lengths(d)
  local t = M.phone_lengths
  local l = t[sub(d, 1, 1)] or t[sub(d, 1, 2)] or t[sub(d, 1, 3)]
  if l then return l[1], l[2] end
  return 10, 15
end

function V.phone(text, rs, re, rd, rg, i, j, nd)
  local s = rs[i]
  local pre = s > 1 and byte(text, s - 1) or nil
  local plus, paren, closed = pre == PLUS, nil, nil
  if pre == LPAREN and rg[i] == "pc" and j > i then paren = i end
  for t = i, j - 1 do
    local g = rg[t]
    if g == "po" then
      if paren then return nil end
      paren = t + 1
    elseif g == "pc" then
      if paren ~= t then return nil end
      closed = t
    elseif g ~= "sp" and g ~= "dash" and g ~= "dot" then
      return nil
    end
  end
  if paren and closed ~= paren then return nil end
  local key
  if plus then
    if paren and paren > i and rd[paren] == "0" then -- the trunk "(0)"
      key = concat(rd, "", i, paren - 1) .. concat(rd, "", paren + 1, j)
    else
      key = concat(rd, "", i, j)
    end
    local lo, hi = country_lengths(key)
    if #key < lo or #key > hi then return nil end
    s = s - 1
  else
    local d = concat(rd, "", i, j)
    local f, l1 = byte(d, 1), #rd[i]
    if f == 56 and nd == 11 and (paren == nil or paren == i + 1) then -- "8 ..."
      if not (l1 == 1 or l1 == 4 or l1 == 11) or not NATIONAL2[byte(d, 2)] then return nil end
      if paren and l1 ~= 1 then return nil end
      key = "7" .. sub(d, 2)
    elseif paren == i and nd == 10 then -- "(495) 123-45-67"
      if l1 < 3 or l1 > 5 or f == 48 or f == 49 then return nil end
      -- no country code: never the same value as a "+" number of the same
      -- digits ("(495) 123-45-67" is not "+49 5123 4567")
      key = "(" .. d
      s = s - 1
    else
      return nil
    end
  end
  return s, key
end

-- The values in a run of k groups. A space between two groups parts two
-- values only when the digits on both sides are values ("89123456789
-- 4000012345678905"); otherwise it may join the pieces of one longer
-- number. So, from the right, the value that would start at each group
-- (the first kind in rank order with a span, its longest), given that a
-- value ends just before it; then, from the left, those whose start is
-- fine as it is or follows a value taken.
-- Can a value of the kind start at group t at all? (before any span is tried)
local START = {
  card = function(text, rs, rd, t) local f = byte(rd[t], 1); return f >= 50 and f <= 54 end, -- 2-6
  passport = function(text, rs, rd, t) local n = #rd[t]; return n == 2 or n == 4 or n == 10 end,
  snils = function(text, rs, rd, t) local n = #rd[t]; return n == 3 or n == 11 end,
  inn = function(text, rs, rd, t) local n = #rd[t]; return n == 10 or n == 12 end,
  phone = function(text, rs, rd, t)
    local b = byte(text, rs[t] - 1)
    return b == PLUS or b == LPAREN or byte(rd[t], 1) == 56 -- "+", "(", 8
  end,
}

local cum, pk, pj, ps, pkey = {}, {}, {}, {}, {}
local function run(text, want, out, rs, re, rd, rg, k)
  cum[0] = 0
  for t = 1, k do
    rd[t] = sub(text, rs[t], re[t])
    cum[t] = cum[t - 1] + re[t] - rs[t] + 1
  end
  pk[k + 1] = nil
  for t = k, 1, -1 do
    pk[t] = nil
    for _, kind in ipairs(NUMERIC) do
      if want[kind] and START[kind](text, rs, rd, t) then
        local lo, hi, valid = MIN_DIGITS[kind], MAX_DIGITS[kind], V[kind]
        local jmax = t + MAX_GROUPS[kind] - 1
        if jmax > k then jmax = k end
        for j = jmax, t, -1 do
          local nd = cum[j] - cum[t - 1]
          if nd < lo then break end
          if nd <= hi then
            local s, key = valid(text, rs, re, rd, rg, t, j, nd)
            if s and right_ok(text, re[j] + 1, kind, pk[j + 1] ~= nil) and left_ok(text, s, kind, true) then
              pk[t], pj[t], ps[t], pkey[t] = kind, j, s, key
              break
            end
          end
        end
        if pk[t] then break end
      end
    end
  end
  local t, after = 1, 0 -- after: the last group of the last value taken
  while t <= k do
    local kind = pk[t]
    if kind and (after == t - 1 and t > 1 or left_ok(text, ps[t], kind, false)) then
      out[#out + 1] = { kind = kind, s = ps[t], e = re[pj[t]], key = pkey[t] }
      after = pj[t]
      t = after + 1
    else
      t = t + 1
    end
  end
end

-- Each digit group of the text once (two anchored finds a group: the
-- scan never restarts at every byte); an IBAN is looked for where a group
-- follows two capital letters at the start of a word.
local function numbers(text, want, out)
  local numeric = want.card or want.passport or want.snils or want.inn or want.phone
  local rs, re, rd, rg = {}, {}, {}, {}
  local k, digits, last, init, iban_end, n = 0, 0, 0, 1, 0, #text
  while true do
    local _, p = find(text, "^%D*", init) -- no backtracking after the last group
    local s = p + 1
    if s > n then break end
    local _, e = find(text, "^%d+", s)
    init = e + 1
    if want.iban and s > iban_end + 2 and UPPER[byte(text, s - 1)] and UPPER[byte(text, s - 2)] then
      local b = s > 3 and byte(text, s - 3) or 0
      if not WORD[b] and b ~= AT then
        local x = iban_at(text, s - 2)
        if x then
          out[#out + 1] = x
          iban_end = x.e
        end
      end
    end
    if numeric then
      local cls, glen = nil, s - last
      if k == 0 then
        cls = nil
      elseif glen == 1 then
        cls = GAP1[byte(text, last)]
      elseif glen <= 16 then
        cls = gap_class(sub(text, last, s - 1))
      end
      if cls then
        rg[k] = cls
      else
        if digits >= 10 then run(text, want, out, rs, re, rd, rg, k) end
        k, digits = 0, 0
      end
      k = k + 1
      rs[k], re[k] = s, e -- the digits themselves: only for a run worth looking at
      digits = digits + e - s + 1
      last = e + 1
    end
  end
  if digits >= 10 then run(text, want, out, rs, re, rd, rg, k) end
end

-- All kinds together -----------------------------------------------------

local function by_start(a, b)
  if a.s ~= b.s then return a.s < b.s end
  return RANK[a.kind] < RANK[b.kind]
end

-- The values of the wanted kinds in text, in order, overlaps resolved.
-- brk: where the model reads a line break (see BREAK), or nil.
local function find_all(text, want, brk)
  BREAK = brk or NO_BREAK
  local c = {}
  if want.email then emails(text, c) end
  if want.iban or want.card or want.passport or want.snils or want.inn or want.phone then
    numbers(text, want, c)
  end
  BREAK = NO_BREAK -- (only this call's scan reads it)
  if #c < 2 then return c end
  sort(c, by_start)
  local acc, n = {}, 0
  for _, x in ipairs(c) do
    local last = acc[n]
    if last and x.s <= last.e then
      local rx, rl = RANK[x.kind], RANK[last.kind]
      if rx < rl or (rx == rl and x.e - x.s > last.e - last.s) then acc[n] = x end
    else
      n = n + 1
      acc[n] = x
    end
  end
  return acc
end

local function kind_set(kinds, who)
  local want = {}
  if kinds == nil then
    for _, k in ipairs(M.KINDS) do want[k] = true end
    return want
  end
  if type(kinds) ~= "table" then
    error(who .. ": kinds must be a list of kind names, got " .. type(kinds), 3)
  end
  for _, k in ipairs(kinds) do
    if not LABEL[k] then
      error(who .. ": unknown kind " .. tostring(k) .. " (known: " .. concat(M.KINDS, ", ") .. ")", 3)
    end
    want[k] = true
  end
  return want
end

--- What mask would replace: { { kind, value, start, stop }, ... } in order.
function M.detect(text, kinds)
  if type(text) ~= "string" then
    error("slm.pii.detect: text must be a string, got " .. type(text), 2)
  end
  local found = find_all(text, kind_set(kinds, "slm.pii.detect"))
  local out = {}
  for i, x in ipairs(found) do
    out[i] = { kind = x.kind, value = sub(text, x.s, x.e), start = x.s, stop = x.e }
  end
  return out
end

-- The masker ---------------------------------------------------------------

local Masker = {}
Masker.__index = Masker

--- A masker: opts.kinds (a list; default every kind).
function M.new(opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("slm.pii.new: options must be a table, got " .. type(opts), 2)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if k ~= "kinds" then error("slm.pii.new: unknown option " .. tostring(k), 2) end
  end
  local want = kind_set(opts.kinds, "slm.pii.new")
  local m = setmetatable({
    kinds = want,
    counts = {},
    _num = {},      -- kind -> normalized value -> number
    _orig = {},     -- kind -> number (string) -> the value as first seen
    _next = {},     -- kind -> the last number issued
    _reserved = {}, -- kind -> number -> true: seen in a text before it was issued
    _issued = 0,
  }, Masker)
  for kind in pairs(want) do
    m.counts[kind] = 0
    m._num[kind], m._orig[kind], m._next[kind], m._reserved[kind] = {}, {}, 0, {}
  end
  for kind in pairs(LABEL) do
    if not m._orig[kind] then m._orig[kind], m._reserved[kind] = {}, {} end
  end
  return m
end

-- Every placeholder-shaped string of text that unmask would read:
-- fn(kind, number_string, first_byte, last_byte) for each.
local function each_placeholder(text, fn)
  for p, word, sep, num, q in gmatch(text, "()%f[%a](%a+)([_ %-])(%d+)()") do
    local label = upper(word)
    local kind = KIND_OF[label]
    if kind and byte(num, 1) ~= 48 then
      local open, close = byte(text, p - 1) == 91, byte(text, q) == 93 -- "[" "]"
      if open and close then
        fn(kind, num, p - 1, q)
      elseif sep == "_" and word == label and not WORD[byte(text, p - 1) or 0]
          and not WORD[byte(text, q) or 0] then
        fn(kind, num, p, q - 1)
      end
    end
  end
end

local LOWER_LABELS = {}
for i, k in ipairs(M.KINDS) do LOWER_LABELS[i] = k end

-- Could text hold a placeholder? A kind's name followed by "_", " " or
-- "-" and a digit, found with plain finds (most texts hold none).
local function may_hold(text)
  if not find(text, "_", 1, true) and not find(text, "[", 1, true) then return false end
  local lt = lower(text)
  for _, name in ipairs(LOWER_LABELS) do
    local _, e = find(lt, name, 1, true)
    while e do
      local c = byte(lt, e + 1)
      if (c == 95 or c == SPACE or c == DASH) and DIGIT[byte(lt, e + 2) or 0] then return true end
      _, e = find(lt, name, e + 1, true)
    end
  end
  return false
end

-- Numbers that a text already holds as placeholders, before they are issued.
local function reserve(m, text)
  if not may_hold(text) then return end
  each_placeholder(text, function(kind, num)
    local n, last = tonumber(num), m._next[kind]
    if last and n > last then m._reserved[kind][n] = true end
  end)
end

local function placeholder(m, kind, key, value)
  local nums = m._num[kind]
  local n = nums[key]
  if not n then
    n = m._next[kind] + 1
    local res = m._reserved[kind]
    while res[n] do n = n + 1 end
    m._next[kind] = n
    nums[key] = n
    m._orig[kind][tostring(n)] = value
    m.counts[kind] = m.counts[kind] + 1
    m._issued = m._issued + 1
  end
  return "[" .. LABEL[kind] .. "_" .. n .. "]"
end

--- text with every value of the masker's kinds replaced by its placeholder.
function Masker:mask(text)
  if type(text) ~= "string" then
    error("slm.pii: mask expects a string, got " .. type(text), 2)
  end
  if not find(text, "[%d@]") then return text end
  reserve(self, text)
  local found = find_all(text, self.kinds)
  if #found == 0 then return text end
  local parts, n, pos = {}, 0, 1
  for _, x in ipairs(found) do
    parts[n + 1] = sub(text, pos, x.s - 1)
    parts[n + 2] = placeholder(self, x.kind, x.key, sub(text, x.s, x.e))
    n, pos = n + 2, x.e + 1
  end
  parts[n + 1] = sub(text, pos)
  return concat(parts)
end

--- text with this masker's placeholders (and their tolerated variants) put back.
function Masker:unmask(text)
  if type(text) ~= "string" then
    error("slm.pii: unmask expects a string, got " .. type(text), 2)
  end
  if self._issued == 0 or (not find(text, "[", 1, true) and not find(text, "_", 1, true)) then
    return text
  end
  local parts, n, pos = nil, 0, 1
  local orig = self._orig
  each_placeholder(text, function(kind, num, a, b)
    local v = orig[kind][num]
    if v then
      parts = parts or {}
      parts[n + 1] = sub(text, pos, a - 1)
      parts[n + 2] = v
      n, pos = n + 2, b + 1
    end
  end)
  if not parts then return text end
  parts[n + 1] = sub(text, pos)
  return concat(parts)
end

--- A streaming unmask: feed(piece) -> the text that can be given out now
-- (unmasked), holding back a tail that could be the start of a
-- placeholder cut between pieces ("[EMA" + "IL_1]"); feed(nil) -> the rest.
-- A held tail is at most HOLD bytes: "[", then letters, "_", " ", "-" and
-- digits, or a trailing run of capitals, digits and "_".
local HOLD = 32
function Masker:unmasker()
  local pending, last = "", ""
  -- unmask what is given out with the byte given out before it in front,
  -- so that a bare placeholder right after a letter ("x" + "PHONE_1")
  -- stays as unmask of the whole text would leave it
  local function out(ready)
    if ready == "" then return "" end
    local u = self:unmask(last .. ready)
    local skip = #last
    last = sub(ready, -1)
    return sub(u, skip + 1)
  end
  return function(piece)
    if piece == nil then
      local rest = pending
      pending = ""
      return out(rest)
    end
    if type(piece) ~= "string" then error("slm.pii: an unmasker is fed strings, got " .. type(piece), 2) end
    local text = pending .. piece
    if self._issued == 0 then
      pending = ""
      if text ~= "" then last = sub(text, -1) end
      return text
    end
    local n = #text
    local from = n + 1
    -- an open bracket near the end with no closing one after it
    local lb = nil
    for i = n, math.max(1, n - HOLD + 1), -1 do
      local c = byte(text, i)
      if c == 93 then break end -- "]"
      if c == 91 then lb = i; break end -- "["
    end
    if lb and not find(text, "[^%w _%-]", lb + 1) then from = lb end
    -- else a trailing run of capitals, digits and "_" ("EMAIL_1" may go
    -- on: "EMAIL_12")
    if from > n then
      -- (a loop over at most HOLD + 1 bytes: a pattern anchored at the
      -- end would try every start, quadratic over a long run)
      local ws = n + 1
      while ws > 1 and n - ws + 1 <= HOLD do
        local c = byte(text, ws - 1)
        if not (UPPER[c] or DIGIT[c] or c == 95) then break end
        ws = ws - 1
      end
      if ws <= n and n - ws < HOLD then from = ws end
    end
    pending = sub(text, from)
    return out(sub(text, 1, from - 1))
  end
end

local function copy(t)
  local c = {}
  for k, v in next, t do c[k] = v end
  local mt = getmetatable(t)
  if mt ~= nil then setmetatable(c, mt) end
  return c
end

local function mask_call(m, call)
  if type(call) ~= "table" or type(call["function"]) ~= "table" then return call end
  local fn = call["function"]
  if type(fn.arguments) ~= "string" then return call end
  local c, f = copy(call), copy(fn)
  f.arguments = m:mask(fn.arguments)
  c["function"] = f
  return c
end

-- Values split between texts -----------------------------------------------
-- The texts of a message (its string content, or its text parts in order)
-- reach the model as one text, concatenated, and so do those of
-- consecutive messages of one role, one after another ("+7 912" then
-- "345-67-89"): a value cut between two of them matches in neither. So
-- the texts of such a chain are also read joined. The parts of a message
-- are joined as they are; where two messages meet, a line break parts
-- them to the model, or nothing ("ivan" then "@example.com"), so the
-- chain is read seven ways: every message joined with nothing between,
-- with a space between ("4111 1111" then "1111 1111"), each second
-- meeting with a space and the others with nothing (two offsets), and
-- each third (three offsets): a value cut two or three ways is then read
-- with its own meetings joined and the meetings beside it parted. In
-- every reading a value may also start or end where two messages meet,
-- whatever is on the other side (the model reads a line break there:
-- BREAK), so "58213" then "4000 0123" then "4567 8905" is a card, and
-- "x@" then "ivan@example.com" an address. Every value found alone in a text or in one of
-- the readings is masked, except one that a meeting of two messages
-- glues on to a value of one text that ends where its message ends (or
-- starts where one starts): "ivan@example.com" then "abc" is not one
-- address, while "ivan@example.com" then "abc" in two parts of one
-- message is "ivan@example.comabc" to the model.
-- Values that overlap are masked together with one placeholder: the
-- value that covers them all (the spaced reading's, the joined one's,
-- then the text's own, in that order of preference), else the text they
-- cover, as one value of the highest kind among them. A value's placeholder goes in the
-- text where it starts, and its pieces in the texts after are removed,
-- so a reply holds it, and unmask restores it, once.

-- The masked texts of one chain: segs[i] = { text =, newmsg = true when
-- it starts a message that is not the chain's first }.
local function mask_joined(m, segs)
  local n, texts, off = #segs, {}, {}
  local pos = 0
  for i = 1, n do
    texts[i], off[i] = segs[i].text, pos
    pos = pos + #segs[i].text
  end
  local joined = concat(texts)
  if not find(joined, "[%d@]") then return texts end
  for i = 1, n do reserve(m, texts[i]) end
  reserve(m, joined)
  -- the meetings of two messages: the join's byte each comes after
  local meets, is_meet = {}, {}
  for i = 2, n do
    local o = off[i]
    if segs[i].newmsg and o > 0 and o < #joined and not is_meet[o] then
      meets[#meets + 1], is_meet[o] = o, true
    end
  end
  local want, all, alone = m.kinds, {}, {} -- alone: the texts' own values, by start
  -- src: 1 a reading with spaces, 2 without, 3 a text alone (a reading's
  -- value that is one of those is left out: most are)
  local function add(found, base, from, src, map)
    for _, x in ipairs(found) do
      local s, e = x.s, x.e
      if map then s, e = map(s), map(e) end
      s, e = base + s, base + e
      local y = alone[s]
      if not (y and y.e == e and y.kind == x.kind) then
        local v = { s = s, e = e, kind = x.kind, key = x.key, value = sub(from, x.s, x.e), src = src }
        all[#all + 1] = v
        if src == 3 then alone[s] = v end
      end
    end
  end
  for i = 1, n do
    if find(texts[i], "[%d@]") then add(find_all(texts[i], want), off[i], texts[i], 3) end
  end
  local brk = {}
  for _, o in ipairs(meets) do brk[o + 1] = true end
  add(find_all(joined, want, brk), 0, joined, 2)
  -- the join with a space after the meetings at[1..]
  local function spaced(at)
    local pieces, from = {}, 1
    for k = 1, #at do
      pieces[k] = sub(joined, from, at[k])
      from = at[k] + 1
    end
    pieces[#at + 1] = sub(joined, from)
    local text = concat(pieces, " ")
    -- a byte of it -> the join's (a value starts and ends on no space
    -- put in); values come in order, so a walk over at
    local k = 0
    local function map(p)
      while k > 0 and at[k] + k >= p do k = k - 1 end
      while k < #at and at[k + 1] + k + 1 < p do k = k + 1 end
      return p - k
    end
    -- where the messages meet in it: after a space put in, or between
    -- two bytes
    local brk, q = {}, 0
    for _, o in ipairs(meets) do
      while q < #at and at[q + 1] <= o do q = q + 1 end
      if at[q] == o then brk[o + q], brk[o + q + 1] = true, true else brk[o + q + 1] = true end
    end
    add(find_all(text, want, brk), 0, text, 1, map)
  end
  if #meets > 0 then spaced(meets) end
  -- every second meeting spaced (two offsets), then every third (three)
  for period = 2, 3 do
    if #meets >= period then
      for r = 0, period - 1 do
        local at = {}
        for k, o in ipairs(meets) do
          if k % period == r then at[#at + 1] = o end
        end
        spaced(at)
      end
    end
  end
  if #all == 0 then return texts end
  -- a value glued across a meeting on to a value of a text alone that
  -- ends there (the same start) or starts there (the same end)
  if #meets > 0 then
    local start_of, end_of = {}, {} -- the texts' own values: by end, by start
    for _, x in ipairs(all) do
      if x.src == 3 then start_of[x.e], end_of[x.s] = x.s, x.e end
    end
    local kept = {}
    for _, x in ipairs(all) do
      local glued = false
      if x.src < 3 then
        for o = x.s, x.e - 1 do
          if is_meet[o] and (start_of[o] == x.s or end_of[o + 1] == x.e) then glued = true; break end
        end
      end
      if not glued then kept[#kept + 1] = x end
    end
    all = kept
  end
  sort(all, function(a, b)
    if a.s ~= b.s then return a.s < b.s end
    if a.e ~= b.e then return a.e > b.e end
    if RANK[a.kind] ~= RANK[b.kind] then return RANK[a.kind] < RANK[b.kind] end
    return a.src < b.src
  end)
  -- clusters of overlapping values -> { s, e, text }
  local reps, i = {}, 1
  while i <= #all do
    local cs, ce, j = all[i].s, all[i].e, i
    while j < #all and all[j + 1].s <= ce do
      j = j + 1
      if all[j].e > ce then ce = all[j].e end
    end
    local best
    for t = i, j do
      local x = all[t]
      if x.s == cs and x.e == ce and (not best or RANK[x.kind] < RANK[best.kind]
          or (RANK[x.kind] == RANK[best.kind] and x.src < best.src)) then
        best = x
      end
    end
    if not best then
      -- none covers them all: the span they cover, as one value of the
      -- highest kind among them (a key of its own: "~" starts no
      -- normalized value)
      for t = i, j do
        if not best or RANK[all[t].kind] < RANK[best.kind] then best = all[t] end
      end
      local v = sub(joined, cs, ce)
      best = { kind = best.kind, key = "~" .. v, value = v }
    end
    reps[#reps + 1] = { s = cs, e = ce, text = placeholder(m, best.kind, best.key, best.value) }
    i = j + 1
  end
  -- each replacement into the texts it spans: its text where it starts,
  -- nothing in the rest
  local edits = {} -- segment -> { from, to, text, ... }
  local g = 1
  for _, r in ipairs(reps) do
    while off[g] + #texts[g] < r.s do g = g + 1 end
    local h, first = g, true
    while true do
      local len = #texts[h]
      if len > 0 then
        local a, b = r.s - off[h], r.e - off[h]
        if a < 1 then a = 1 end
        if b > len then b = len end
        local e = edits[h] or {}
        edits[h] = e
        e[#e + 1], e[#e + 2], e[#e + 3] = a, b, first and r.text or ""
        first = false
      end
      if off[h] + len >= r.e then break end
      h = h + 1
    end
  end
  for k, e in pairs(edits) do
    local t, parts, from = texts[k], {}, 1
    for q = 1, #e, 3 do
      parts[#parts + 1] = sub(t, from, e[q] - 1)
      parts[#parts + 1] = e[q + 2]
      from = e[q + 1] + 1
    end
    parts[#parts + 1] = sub(t, from)
    texts[k] = concat(parts)
  end
  return texts
end

--- A new list of chat messages: string contents, text parts and tool call
--- arguments masked; roles, names, ids, images and other parts as they were.
--- The texts of a message, and of consecutive messages of one role, are
--- masked as the model reads them: joined (mask_joined).
function Masker:mask_messages(messages)
  if type(messages) ~= "table" then
    error("slm.pii: mask_messages expects a list of messages, got " .. type(messages), 2)
  end
  local out = copy(messages)
  -- first the copies, and where each text goes: slots[i] = { table, key,
  -- text, ... } for message i
  local slots = {}
  for i = 1, #messages do
    local msg = messages[i]
    if type(msg) == "table" then
      local c = copy(msg)
      local content = msg.content
      local slot = {}
      if type(content) == "string" then
        slot[1], slot[2], slot[3] = c, "content", content
      elseif type(content) == "table" then
        local parts = copy(content)
        for k = 1, #content do
          local part = content[k]
          if type(part) == "table" and part.type == "text" and type(part.text) == "string" then
            local p = copy(part)
            parts[k] = p
            slot[#slot + 1], slot[#slot + 2], slot[#slot + 3] = p, "text", part.text
          end
        end
        c.content = parts
      end
      slots[i] = slot
      out[i] = c
    end
  end
  -- then the texts, chain by chain (a chain: consecutive messages of one
  -- role with a string or list content), and each message's tool calls
  local function chained(i)
    local a, b = messages[i - 1], messages[i]
    return i > 1 and type(a) == "table" and type(b) == "table" and a.role == b.role
      and (type(a.content) == "string" or type(a.content) == "table")
      and (type(b.content) == "string" or type(b.content) == "table")
  end
  local i = 1
  while i <= #messages do
    local j = i
    while j < #messages and chained(j + 1) do j = j + 1 end
    local segs = {}
    for k = i, j do
      local slot = slots[k]
      for q = 1, slot and #slot or 0, 3 do
        segs[#segs + 1] = { text = slot[q + 2], newmsg = q == 1 and k > i, t = slot[q], key = slot[q + 1] }
      end
    end
    if #segs == 1 then
      segs[1].t[segs[1].key] = self:mask(segs[1].text)
    elseif #segs > 1 then
      local masked = mask_joined(self, segs)
      for q, sg in ipairs(segs) do sg.t[sg.key] = masked[q] end
    end
    for k = i, j do
      local msg, c = messages[k], out[k]
      if type(msg) == "table" then
        if type(msg.tool_calls) == "table" then
          local calls = copy(msg.tool_calls)
          for q = 1, #calls do calls[q] = mask_call(self, calls[q]) end
          c.tool_calls = calls
        end
        if type(msg.function_call) == "table" and type(msg.function_call.arguments) == "string" then
          local f = copy(msg.function_call)
          f.arguments = self:mask(f.arguments)
          c.function_call = f
        end
      end
    end
    i = j + 1
  end
  return out
end

local function unmask_deep(m, v, seen)
  local t = type(v)
  if t == "string" then return m:unmask(v) end
  if t ~= "table" then return v end
  if seen[v] then return seen[v] end
  local c = {}
  seen[v] = c
  for k, x in next, v do
    if type(k) == "string" then k = m:unmask(k) end
    c[k] = unmask_deep(m, x, seen)
  end
  local mt = getmetatable(v)
  if mt ~= nil then setmetatable(c, mt) end
  return c
end

--- A deep copy of v (a decoded JSON value) with every string, keys too, unmasked.
function Masker:unmask_value(v)
  return unmask_deep(self, v, {})
end

return M
