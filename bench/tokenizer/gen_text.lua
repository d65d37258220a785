-- gen_text.lua CORPUS OUTDIR - deterministic benchmark texts from the
-- tokenizer fixture corpus (no downloads):
--   english.txt   ~10 MB of English sentences built from the corpus' words
--   mixed.txt     ~2 MB of Russian prose, code lines and numbers
--   a200k.txt     "a" x 200000          spaces200k.txt  200000 spaces
--   letters100k.txt  100 KB of mixed-case letters with no space
local corpus_path, out = arg[1], arg[2]
assert(corpus_path and out, "usage: gen_text.lua CORPUS OUTDIR")
os.execute("mkdir -p '" .. out .. "'")

local f = assert(io.open(corpus_path, "rb"))
local corpus = f:read("*a")
f:close()
local lines = {}
for l in corpus:gmatch("([^\n]*)\n") do lines[#lines + 1] = l end

local seed = 20240630
local function rnd(n) -- 1..n
  seed = (seed * 1103515245 + 12345) % 2147483648
  return math.floor(seed / 65536) % n + 1
end

local function words_of(pred, pattern)
  local w, seen = {}, {}
  for i, l in ipairs(lines) do
    if pred(i, l) then
      for word in l:gmatch(pattern) do
        if not seen[word] then seen[word] = true; w[#w + 1] = word end
      end
    end
  end
  return w
end

local function write(name, s)
  local o = assert(io.open(out .. "/" .. name, "wb"))
  o:write(s)
  o:close()
end

-- English: sentences of 4..24 corpus words, Zipf-like reuse (words early
-- in the list are picked more often), commas, numbers, paragraphs.
local eng_words = words_of(function(i, l) return i <= 27 or l:find("^Repeated words") or
  l:find("^support ") end, "[%a']+")
local function pick(list)
  local a, b = rnd(#list), rnd(#list)
  return list[math.min(a, b)]
end
do
  local parts, size = {}, 0
  while size < 10e6 do
    local n = 3 + rnd(21)
    local s = {}
    for k = 1, n do
      local w = pick(eng_words)
      if k == 1 then w = w:sub(1, 1):upper() .. w:sub(2) end
      s[k] = w
      if k < n and rnd(9) == 1 then s[k] = s[k] .. "," end
      if rnd(40) == 1 then s[k] = s[k] .. " " .. tostring(rnd(100000)) end
    end
    local sent = table.concat(s, " ") .. ({ ".", ".", ".", "?", "!" })[rnd(5)]
    sent = sent .. (rnd(6) == 1 and "\n\n" or " ")
    parts[#parts + 1] = sent
    size = size + #sent
  end
  write("english.txt", table.concat(parts))
end

-- Mixed: Russian sentences, code lines from the corpus, numbers.
local ru_words = words_of(function(_, l) return l:find("[\208\209]") ~= nil end, "[\208\209][\128-\191][\208\209\128-\191]*")
local code = {}
for i, l in ipairs(lines) do
  if (i >= 80 and i <= 120) and l ~= "" then code[#code + 1] = l end
end
do
  local parts, size = {}, 0
  while size < 2e6 do
    local kind = rnd(3)
    local s
    if kind == 1 then
      local w = {}
      for k = 1, 4 + rnd(16) do w[k] = pick(ru_words) end
      s = table.concat(w, " ") .. ". "
    elseif kind == 2 then
      s = code[rnd(#code)] .. "\n"
    else
      local nums = {}
      for k = 1, 1 + rnd(8) do
        local r = rnd(4)
        nums[k] = r == 1 and tostring(rnd(1000000)) or r == 2 and string.format("%d.%02d", rnd(9999), rnd(99))
          or r == 3 and string.format("%04d-%02d-%02d", 1990 + rnd(40), rnd(12), rnd(28))
          or tostring(rnd(2147483647)) .. tostring(rnd(2147483647))
      end
      s = table.concat(nums, ", ") .. "\n"
    end
    parts[#parts + 1] = s
    size = size + #s
  end
  write("mixed.txt", table.concat(parts))
end

write("a200k.txt", ("a"):rep(200000))
write("spaces200k.txt", (" "):rep(200000))
do
  local t = {}
  local letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
  for i = 1, 100000 do local k = rnd(#letters); t[i] = letters:sub(k, k) end
  write("letters100k.txt", table.concat(t))
end
