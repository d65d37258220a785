--- slm.tokenizer: byte-level BPE token counting, encoding and truncation.
--
--   local T = require "slm.tokenizer"
--   local tok = T.get("gpt-4o-mini")      -- or "o200k_base", "cl100k_base", "llama3"
--   tok:count(s) tok:encode(s [, opts]) tok:decode(ids) tok:truncate(s, n) tok:chunks(s, n, overlap)
--
-- The work is done in C (slm.core, csrc/bpe.c + csrc/pretok.c) and gives
-- the same token ids as OpenAI's tiktoken.  o200k_base and cl100k_base ship
-- with the library (lua/slm/data/, MIT).  Meta's Llama 3 vocabulary does
-- not (Llama 3 Community License): point SLM_LLAMA3_VOCAB or opts.file at
-- Meta's tokenizer.model (tiktoken format) or a Hugging Face tokenizer.json,
-- or fetch one with bin/slm-fetch-llama3.  Without it, T.get("llama3")
-- returns an *estimating* tokenizer (tok.estimate == true): its counts are
-- cl100k_base counts (see ESTIMATE below) and it cannot encode or decode.
--
-- Works the same in plain Lua 5.4, batch jobs and OpenResty (LuaJIT): no
-- I/O except reading a vocabulary file once, on first use.
local core = require "slm.core"

local type, error, pairs, ipairs, next, setmetatable, getmetatable, tostring =
  type, error, pairs, ipairs, next, setmetatable, getmetatable, tostring
local char, lower, format = string.char, string.lower, string.format
local floor, ceil, max, min = math.floor, math.ceil, math.max, math.min
local open, getenv = io.open, os.getenv

local M = {}

-- Directory holding the shipped vocabularies: data/ next to this file.
local function data_dir()
  local src = debug.getinfo(1, "S").source
  local dir = src:sub(1, 1) == "@" and src:sub(2):match("^(.*)[/\\][^/\\]*$")
  return (dir or ".") .. "/data"
end
M.data_dir = getenv("SLM_DATA_DIR") or data_dir()

-- Llama 3.1 special tokens (Meta's tokenizer.py); Hermes 3 is a Llama 3.1
-- fine-tune.  A Hugging Face tokenizer.json brings its own list instead.
local function llama3_specials()
  local names = {
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
  }
  local sp = {}
  for i, name in ipairs(names) do sp[name] = 128000 + i - 1 end
  for i = 3, 247 do sp["<|reserved_special_token_" .. i .. "|>"] = 128000 + 8 + i end
  return sp
end

--- Encodings: data, so users can add their own (same shape).
-- file: tiktoken file name in M.data_dir; pretok: which split rules;
-- specials: { [text] = id }; sha256 of the shipped file (checked by tests).
M.encodings = {
  o200k_base = {
    file = "o200k_base.tiktoken", pretok = "o200k",
    sha256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    specials = { ["<|endoftext|>"] = 199999, ["<|endofprompt|>"] = 200018 },
  },
  cl100k_base = {
    file = "cl100k_base.tiktoken", pretok = "cl100k",
    sha256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    specials = {
      ["<|endoftext|>"] = 100257, ["<|fim_prefix|>"] = 100258,
      ["<|fim_middle|>"] = 100259, ["<|fim_suffix|>"] = 100260,
      ["<|endofprompt|>"] = 100276,
    },
  },
  llama3 = {
    pretok = "llama3", env = "SLM_LLAMA3_VOCAB", specials = llama3_specials(),
    -- Without a vocabulary file: counts from cl100k_base.  Llama 3 splits
    -- text with the same rules, and its first 100,256 tokens are
    -- cl100k_base's with the same ranks; the 28K extra (mostly
    -- non-English) tokens only merge further, so the estimate is usually
    -- exact for English and a little high (safe for budgets) elsewhere.
    estimate = { encoding = "cl100k_base", factor = 1.0 },
  },
}

--- Model name -> encoding.  Lua patterns matched in order against the
-- lower-cased model name, with and without a "provider/" prefix.  Entries
-- added with M.register_model come first.
M.models = {
  { "^gpt%-4o", "o200k_base" }, { "^chatgpt%-4o", "o200k_base" },
  { "^gpt%-4%.1", "o200k_base" }, { "^gpt%-4%.5", "o200k_base" },
  { "^gpt%-5", "o200k_base" }, { "^o1", "o200k_base" }, { "^o3", "o200k_base" },
  { "^o4", "o200k_base" },
  { "^gpt%-4$", "cl100k_base" }, { "^gpt%-4%-", "cl100k_base" },
  { "^gpt%-3%.5%-turbo", "cl100k_base" }, { "^gpt%-35%-turbo", "cl100k_base" },
  { "^text%-embedding%-3", "cl100k_base" }, { "^text%-embedding%-ada%-002", "cl100k_base" },
  { "hermes%-3", "llama3" }, { "llama%-3", "llama3" }, { "llama3", "llama3" },
}

--- Map model names matching a Lua pattern to an encoding:
-- register_model("^my%-model", "cl100k_base"), or several at once:
-- register_model{ ["^my%-model"] = "cl100k_base", ["^other"] = "o200k_base" }.
function M.register_model(pattern, encoding)
  if type(pattern) == "table" and encoding == nil then
    for p, e in pairs(pattern) do M.register_model(p, e) end
    return
  end
  if type(pattern) ~= "string" then error("register_model: pattern must be a string", 2) end
  if type(encoding) ~= "string" or not M.encodings[encoding] then
    error(format("register_model: unknown encoding '%s'", tostring(encoding)), 2)
  end
  table.insert(M.models, 1, { pattern, encoding })
end

--- Encoding name for a model name (or an encoding name), or nil.
function M.encoding_for(name)
  if M.encodings[name] then return name end
  local full = lower(name)
  local short = full:match("^[^/]*/(.+)$")
  for _, m in ipairs(M.models) do
    if full:find(m[1]) or (short and short:find(m[1])) then return m[2] end
  end
  return nil
end

------------------------------------------------------------------ loading

local read_file = require("slm.fileio").read_all

-- GPT-2's byte <-> printable character table used by Hugging Face
-- byte-level BPE vocabularies: printable Latin-1 bytes stand for
-- themselves, the other 68 bytes for U+0100 upwards.
local function hf_byte_decoder()
  local dec, n = {}, 0
  local function utf8char(cp)
    if cp < 0x80 then return char(cp) end
    return char(0xC0 + floor(cp / 64), 0x80 + cp % 64)
  end
  for b = 0, 255 do
    local printable = (b >= 33 and b <= 126) or (b >= 161 and b <= 172) or (b >= 174)
    if printable then dec[utf8char(b)] = char(b)
    else dec[utf8char(256 + n)] = char(b); n = n + 1 end
  end
  return dec
end

--- Ranks and specials from a Hugging Face tokenizer.json (byte-level BPE,
-- as Llama 3's): returns { [bytes] = id }, { [text] = id }.
function M.from_hf_json(text)
  local cjson = require "cjson.safe"
  local j, err = cjson.decode(text)
  if type(j) ~= "table" then return nil, "tokenizer.json: " .. tostring(err) end
  local model = j.model
  if type(model) ~= "table" or model.type ~= "BPE" or type(model.vocab) ~= "table" then
    return nil, "tokenizer.json: not a BPE model"
  end
  local dec = hf_byte_decoder()
  local ranks = {}
  for k, id in pairs(model.vocab) do
    local bytes = k:gsub("[\1-\127\194-\244][\128-\191]*", dec)
    ranks[bytes] = id
  end
  local specials = {}
  for _, t in ipairs(j.added_tokens or {}) do
    if type(t.content) == "string" and type(t.id) == "number" and ranks[t.content] ~= t.id then
      specials[t.content] = t.id
    end
  end
  return ranks, specials
end

-- Cache per encoding and file: the vocabulary is loaded once.
local loaded = {}

local Tokenizer = {}
Tokenizer.__index = Tokenizer

local function load_encoding(name, file)
  local enc = M.encodings[name]
  local key = name .. "\0" .. (file or "")
  if loaded[key] then return loaded[key] end
  local path = file or (enc.file and (M.data_dir .. "/" .. enc.file))
  if not path then return nil end
  local bpe, err, head
  local f = open(path, "rb")
  if f then head = f:read(1); f:close() end
  if head == "{" then
    local text, rerr = read_file(path)
    if not text then return nil, rerr end
    local ranks, specials = M.from_hf_json(text)
    if not ranks then return nil, specials end
    local ok
    ok, bpe = pcall(core.bpe_new, ranks, enc.pretok, next(specials) and specials or enc.specials)
    if not ok then return nil, bpe end
  else
    local ok
    ok, bpe, err = pcall(core.bpe_load, path, enc.pretok, enc.specials)
    if not ok then return nil, bpe end -- malformed file
    if not bpe then return nil, err end -- cannot open
  end
  local tok = setmetatable({ name = name, estimate = false, file = path, _bpe = bpe }, Tokenizer)
  loaded[key] = tok
  return tok
end

local cache = {}

--- Tokenizer for a model or encoding name, cached per name.
-- opts.file: vocabulary file to use instead of the shipped one (for
-- "llama3": Meta's tokenizer.model or a tokenizer.json; default
-- SLM_LLAMA3_VOCAB).  opts.estimate: for "llama3", the estimating
-- tokenizer even when a vocabulary is available.
-- Unknown names and bad arguments raise.  A vocabulary file that cannot be
-- read or parsed gives nil, message.  "llama3" with no file at all (no
-- opts.file, no SLM_LLAMA3_VOCAB) gives the estimating tokenizer.
function M.get(name, opts)
  if type(name) ~= "string" then error("tokenizer name must be a string", 2) end
  if opts ~= nil and type(opts) ~= "table" then error("opts must be a table", 2) end
  local file = opts and opts.file
  local want_estimate = opts and opts.estimate
  if file ~= nil and type(file) ~= "string" then error("opts.file must be a string", 2) end
  local ck = name .. "\0" .. (file or "") .. (want_estimate and "\0estimate" or "")
  if cache[ck] then return cache[ck] end
  local ename = M.encoding_for(name)
  if not ename then error(format("unknown model or encoding '%s'", name), 2) end
  local enc = M.encodings[ename]
  if not file and enc.env then
    file = getenv(enc.env)
    if file == "" then file = nil end
  end
  if want_estimate and not enc.estimate then
    error(format("%s has no estimate: its vocabulary ships with slm", ename), 2)
  end
  local tok, err
  if (file or enc.file) and not want_estimate then
    tok, err = load_encoding(ename, file)
    if not tok then
      return nil, format("cannot load the %s vocabulary: %s", ename, tostring(err))
    end
  end
  if not tok then
    local base, berr = load_encoding(enc.estimate.encoding)
    if not base then return nil, berr end
    tok = setmetatable({
      name = ename, estimate = true, estimate_base = enc.estimate.encoding,
      estimate_factor = enc.estimate.factor, _bpe = base._bpe, _specials = enc.specials,
    }, Tokenizer)
  end
  cache[ck] = tok
  return tok
end

------------------------------------------------------------------ methods

local function check_text(s, fname)
  if type(s) ~= "string" then
    error(format("%s: expected a string, got %s", fname, type(s)), 3)
  end
end

local function allowed_of(opts)
  if opts == nil then return nil end
  if type(opts) ~= "table" then error("encode: opts must be a table", 3) end
  local a = opts.allowed_special
  if a == nil or a == "all" or type(a) == "table" then return a end
  error("encode: allowed_special must be \"all\" or a set of token texts", 3)
end

local function packed_of(opts)
  local p = type(opts) == "table" and opts.packed
  if p == nil or type(p) == "boolean" then return p end
  error("encode: opts.packed must be a boolean", 3)
end

-- The metatable of slm.IdList (csrc/idlist.c), to tell one apart.
local IDLIST = getmetatable(core.idlist_from_bytes(""))

local function no_ids(self, fname)
  if self.estimate then
    error(format("%s: the %s vocabulary is not loaded (set SLM_LLAMA3_VOCAB or "
      .. "opts.file; see bin/slm-fetch-llama3): this tokenizer only estimates counts",
      fname, self.name), 3)
  end
end

--- Token ids of s: a table, or with opts.packed = true an slm.IdList
-- (csrc/idlist.c: #ids, ids[i], ids:ipairs(), ids:totable(), ids:bytes()).
-- Special-token text is ordinary text unless allowed:
-- opts.allowed_special = "all" or { ["<|endoftext|>"] = true }.
function Tokenizer:encode(s, opts)
  check_text(s, "encode")
  no_ids(self, "encode")
  return self._bpe:encode(s, allowed_of(opts), packed_of(opts))
end

--- Bytes of a list of token ids (a table or an slm.IdList); raises on an
-- unknown id.
function Tokenizer:decode(ids)
  if type(ids) ~= "table" and getmetatable(ids) ~= IDLIST then
    error("decode: expected a table of token ids or an slm.IdList, got " .. type(ids), 2)
  end
  no_ids(self, "decode")
  return self._bpe:decode(ids)
end

--- Number of tokens of s (counted in C, no table built).  An estimate when
-- self.estimate is true.
function Tokenizer:count(s, opts)
  check_text(s, "count")
  local n = self._bpe:count(s, allowed_of(opts))
  if self.estimate and self.estimate_factor ~= 1 then
    n = ceil(n * self.estimate_factor)
  end
  return n
end

-- Token limits beyond any text's count (math.huge, 2^63) mean "no limit":
-- capped here, as the C core takes integers.  A text of 2^40 bytes is
-- already beyond memory, so the cap never shortens a result.
local LIMIT_CAP = 2 ^ 40

--- Longest prefix of s with at most n tokens that does not split a UTF-8
-- character (s itself when it fits).
function Tokenizer:truncate(s, n)
  check_text(s, "truncate")
  if type(n) ~= "number" or not (n >= 0) then error("truncate: n must be a number >= 0", 2) end
  n = floor(min(n, LIMIT_CAP))
  if self.estimate and self.estimate_factor ~= 1 then n = floor(n / self.estimate_factor) end
  return self._bpe:truncate(s, n)
end

--- Pieces of s of at most n tokens each, consecutive pieces overlapping by
-- about `overlap` tokens, covering s.  Second result: the 1-based byte
-- offset in s where each piece starts.
function Tokenizer:chunks(s, n, overlap)
  check_text(s, "chunks")
  overlap = overlap or 0
  if type(n) ~= "number" or not (n >= 1) then error("chunks: n must be a number >= 1", 2) end
  if type(overlap) ~= "number" or not (overlap >= 0 and overlap < n) then
    error("chunks: overlap must be a number >= 0 and < n", 2)
  end
  n = floor(min(n, LIMIT_CAP))
  overlap = floor(min(overlap, n - 1))
  if self.estimate and self.estimate_factor ~= 1 then
    n = max(1, floor(n / self.estimate_factor))
    overlap = min(overlap, n - 1)
  end
  return self._bpe:chunks(s, n, overlap)
end

--- Id of a special token ("<|endoftext|>"), or nil.
function Tokenizer:special(text)
  if type(text) ~= "string" then error("special: expected a string", 2) end
  if self._specials then return self._specials[text] end
  return self._bpe:special(text)
end

--- The pre-tokenizer's pieces (for tests and debugging).
function Tokenizer:split(s)
  check_text(s, "split")
  return self._bpe:split(s)
end

--- Bytes of one token id, or nil.
function Tokenizer:token_bytes(id)
  no_ids(self, "token_bytes")
  return self._bpe:token_bytes(id)
end

--- Bytes of C memory its vocabulary holds (tables, specials, caches and
-- scratch grown so far).  One vocabulary per encoding and process: every
-- tokenizer of it (estimates included) shares it; loaded in init_by_lua,
-- nginx's workers share its pages copy-on-write.
function Tokenizer:memory()
  return self._bpe:info().bytes
end

function Tokenizer:__tostring()
  return format("slm.Tokenizer(%s%s)", self.name, self.estimate and ", estimate" or "")
end

M.Tokenizer = Tokenizer

-- T(name, opts) is T.get(name, opts)
return setmetatable(M, { __call = function(_, ...) return M.get(...) end })
