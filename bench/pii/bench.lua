-- bench/pii/bench.lua - slm.pii's cost on mixed text: microseconds of CPU
-- per KB for mask (every kind), unmask of the masked text, detect, and
-- mask of text with no personal data; then inputs built to be slow
-- (long runs of letters, digits, "@", digit groups), which must stay
-- linear. Not a test: nothing here gates CI.
--
--   LUA_PATH="lua/?.lua;;" lua5.4 bench/pii/bench.lua
--   LUA_PATH="lua/?.lua;;" luajit bench/pii/bench.lua
local pii = require "slm.pii"
local clock = os.clock
local SECONDS = tonumber(os.getenv("BENCH_SECONDS")) or 0.5

-- About 1 KB of a support ticket: Russian and English prose, dates,
-- prices, order numbers, and six values to mask (all made up).
local ticket = table.concat({
  "Здравствуйте! Заказ #58213 от 2024-05-17 (12:30) на сумму 1 299,00 руб. не пришёл. ",
  "Счёт INV-20931 оплачен картой 4000 0123 4567 8905. Пишите на ivan.petrov@example.com ",
  "или звоните +7 912 345-67-89, лучше после 18:00. Hello, our office in London ",
  "(+44 20 7946 0958) also tried to reach you about the refund of 45.90 EUR to ",
  "IBAN DE41 5001 0517 0123 4567 89. Реквизиты: ИНН 5001007329, КПП 500101001. ",
  "Товары: артикул 100-2003, 3 шт. по 433 руб.; артикул 100-2004, 1 шт. Доставка ",
  "курьером, трек-номер 80085412345678, ожидали 20.05.2024 с 10:00 до 14:00. ",
  "Please confirm the new delivery window and send the receipt again, thank you. ",
  "С уважением, Иван.\n",
}, "")
local plain = (ticket:gsub("[%d@]", "x"))

local function per_kb(fn, text)
  local n, t0 = 0, clock()
  repeat
    for _ = 1, 50 do fn(text) end
    n = n + 50
  until clock() - t0 >= SECONDS
  return (clock() - t0) / n * 1e6 / (#text / 1024)
end

local doc = ticket:rep(16) -- 16 KB: placeholders repeat, as in a long thread
local m = pii.new()
local masked = m:mask(doc)
print(("%s, %d-byte ticket x16 (%d values per ticket)"):format(
  jit and jit.version or _VERSION, #ticket, #pii.detect(ticket)))
print(("  mask            %7.1f us/KB"):format(per_kb(function(s) return m:mask(s) end, doc)))
print(("  unmask          %7.1f us/KB"):format(per_kb(function(s) return m:unmask(s) end, masked)))
print(("  detect          %7.1f us/KB"):format(per_kb(pii.detect, doc)))
print(("  mask, no values %7.1f us/KB"):format(per_kb(function(s) return m:mask(s) end, plain:rep(16))))

print("  slow-looking inputs, 200 KB each:")
for _, case in ipairs{
  { "letters", ("a"):rep(200000) },
  { "letters then @", ("a"):rep(200000) .. "@" },
  { "@ every 2 bytes", ("a@"):rep(100000) },
  { "digits", ("7"):rep(200000) },
  { "digit groups", ("12 "):rep(66666) },
  { "4-digit groups", ("4000 "):rep(40000) },
  { "placeholders", ("[EMAIL_1] "):rep(20000) },
  { "upper + digits", ("DE89"):rep(50000) },
} do
  local t0 = clock()
  m:mask(case[2])
  m:unmask(case[2])
  print(("    %-16s %6.1f ms"):format(case[1], (clock() - t0) * 1000))
end
