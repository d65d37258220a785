-- gen.lua FILE [MB] - writes the benchmark's CSV: MB megabytes (default 50)
-- of support tickets, deterministic (a fixed linear congruential sequence,
-- no downloads): a header, then id, created, customer, subject, body,
-- amount, status; every body is quoted and spans 1 to 4 lines, with commas,
-- doubled quotes and UTF-8 (Russian, accents, euro signs); a few subjects
-- are quoted too. Lines end with CRLF, as RFC 4180 writes them.
local path = assert(arg[1], "usage: gen.lua FILE [MB]")
local target = math.floor((tonumber(arg[2]) or 50) * 1024 * 1024)

local seed = 14
local function rnd(n)
  seed = (seed * 1103515245 + 12345) % 2147483648
  return seed % n + 1
end

local WORDS = {
  "order", "refund", "invoice", "delivery", "late", "broken", "the", "a", "my", "please",
  "account", "password", "reset", "charged", "twice", "box", "arrived", "damaged", "help",
  "заказ", "доставка", "возврат", "счёт", "спасибо", "café", "naïve", "€49.90", "ASAP",
  "cannot", "login", "since", "yesterday", "shipping", "label", "wrong", "address",
}
local NAMES = { "Anna Petrova", "Jean-Luc Martin", "O'Brien, Kate", "Иван Смирнов", "Zoë Müller", "Li Wei" }
local STATUS = { "open", "closed", "pending" }

local function words(n)
  local t = {}
  for i = 1, n do t[i] = WORDS[rnd(#WORDS)] end
  return table.concat(t, " ")
end

local function quoted(s) return '"' .. s:gsub('"', '""') .. '"' end

local out = assert(io.open(path, "wb"))
out:write("id,created,customer,subject,body,amount,status\r\n")
local size, id = 0, 0
while size < target do
  local parts = {}
  for i = 1, 200 do
    id = id + 1
    local lines = {}
    for l = 1, rnd(4) do
      local w = words(rnd(12) + 2)
      if rnd(3) == 1 then w = w .. ', "' .. words(2) .. '"' end
      lines[l] = w
    end
    local name = NAMES[rnd(#NAMES)]
    local subject = words(rnd(5) + 1)
    if rnd(5) == 1 then subject = subject .. ", again" end
    parts[i] = table.concat({
      tostring(id),
      string.format("2026-%02d-%02dT%02d:%02d:00Z", rnd(12), rnd(28), rnd(24) - 1, rnd(60) - 1),
      name:find(",") and quoted(name) or name,
      subject:find(",") and quoted(subject) or subject,
      quoted(table.concat(lines, "\r\n")),
      string.format("%d.%02d", rnd(500), rnd(100) - 1),
      STATUS[rnd(3)],
    }, ",") .. "\r\n"
  end
  local chunk = table.concat(parts)
  out:write(chunk)
  size = size + #chunk
end
out:close()
io.stderr:write(string.format("gen.lua: %s: %.1f MB, %d records\n", path, size / 1048576, id))
