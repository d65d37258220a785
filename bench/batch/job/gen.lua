-- bench/batch/job/gen.lua N OUT.csv: N support tickets (id, subject, text),
-- deterministic, some with quotes, commas and newlines in the text.
local n, path = tonumber(arg[1]), arg[2]
local subjects = { "Refund", "Parcel", "Account", "Invoice", "Thanks" }
local texts = {
  'I was charged twice for order %d, please refund the "duplicate" payment',
  "Where is my parcel %d? The courier said Tuesday,\nit is Friday now",
  "Thanks for the great service on order %d",
  "The invoice %d has the wrong VAT number, please reissue it",
  "My package %d arrived damaged, the box was crushed",
}
local function q(s) return s:find('[",\r\n]') and '"' .. s:gsub('"', '""') .. '"' or s end
local f = assert(io.open(path, "wb"))
f:write("id,subject,text\r\n")
for i = 1, n do
  local k = i % #texts + 1
  f:write(("T-%d,%s,%s\r\n"):format(i, q(subjects[k]), q(texts[k]:format(100000 + i))))
end
f:close()
