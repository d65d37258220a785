-- mutate_documents.lua - can every spec of tests/documents_spec.lua fail?
--
--   lua5.4 tests/tools/mutate_documents.lua         # every mutation
--   lua5.4 tests/tools/mutate_documents.lua 4 17    # only these
--
-- A mutation breaks one module of the document tasks (lua/slm/tasks/
-- extract, summarize, generate, common, structured) in one way (literal
-- replacements, each of which must match exactly once); the broken copy
-- goes to a scratch directory that comes first on the spec's package.path,
-- the rest of lua/ is used as it is. Prints what each mutation made fail,
-- then the specs no mutation made fail. Exits 1 when a mutation broke
-- nothing, no longer applies (the code moved on: update it) or a spec
-- never failed. A dev tool: bin/test does not run it.
local root = debug.getinfo(1, "S").source:match("^@(.*)/tests/tools/") or "."
package.path = root .. "/?.lua;" .. package.path
local H = require "tests.helpers"
local q = H.q

local MUTATIONS = {
  -- extract: chunks
  { "extract", "chunks too small", "local budget = o.chunk_tokens or chunk_budget(model, client, base, reply_tokens)",
    "local budget = o.chunk_tokens or 10" },
  { "extract", "the short form returns the result", "  return res.data, res\nend", "  return res, res\nend" },
  { "extract", "never chunked", "if o.chunk_tokens or tok:count(doc) > budget then", "if false then" },
  { "extract", "chunks one at a time", "{ concurrency = o.concurrency or 4 })", "{ concurrency = 1 })" },
  { "extract", "no overlap", "min(o.overlap or 200, math.floor(budget / 4))", "0" },
  { "extract", "chunks sent after a failure", "    if failed then return nil, SKIPPED end\n", "" },
  { "extract", "chunk not named in the error", "if type(err) == \"table\" and #chunks > 1 then err.chunk = i end", "" },
  { "extract", "repairs not counted", "if meta.repaired then repaired = repaired + 1 end", "" },
  -- extract: merging
  { "extract", "no de-duplication", "local at = id and seen[id]", "local at = nil" },
  { "extract", "key ignored", "  local k = key_for(key, path)\n", "  local k = nil\n" },
  { "extract", "key paths without []", 'return key[path] or key[(path:gsub("%[%d+%]", "[]"))]', "return key[path]" },
  { "extract", "same-key items not merged",
    'if id:sub(1, 2) == "k:" then out[at] = merge(out[at], x, items, step(path, at), key, conflicts, quotes) end', "" },
  { "extract", "conflicts never reported", "  if not same(a, b) then\n", "  if false then\n" },
  { "extract", "the last chunk's scalar kept", "    if not known then c.values[#c.values + 1] = b end\n  end\n  return a",
    "    if not known then c.values[#c.values + 1] = b end\n  end\n  return b" },
  { "extract", "merged data not validated", "if #chunks > 1 or o.evidence or masker then", "if false then" },
  -- extract: evidence
  { "extract", "quotes not checked", 'quote:find("%S") and doc:find(normalize(quote), 1, true)', 'quote:find("%S")' },
  { "extract", "quotes left at the chunk's index", "    move_quote(quotes, list, i, out, #out)\n", "" },
  { "extract", "dropped fields fail validation", "    if dp == ep or", "    if false and dp == ep or" },
  -- extract: images, personal data
  { "extract", "images to any fallback", "max_tokens = o.max_tokens, timeout = o.timeout, fallback = fallback,",
    "max_tokens = o.max_tokens, timeout = o.timeout," },
  { "common", "no vision fallback", "      if fi and fi.vision then chosen = m; break end", "" },
  { "common", "images to a model without vision", "    return not info or info.vision ~= false", "    return true" },
  { "extract", "document not masked", "    doc = masker:mask(doc)\n", "" },
  { "extract", "data not unmasked", "    merged = masker:unmask_value(merged)\n", "" },
  { "extract", "evidence not unmasked", "    if evidence then evidence = masker:unmask_value(evidence) end\n", "" },
  { "extract", "conflicts not unmasked", "    list = masker:unmask_value(list)\n", "" },
  -- the ledger and the structured path
  { "common", "completion tokens not summed", "acc.completion_tokens = acc.completion_tokens + (u.completion_tokens or 0)",
    "acc.completion_tokens = u.completion_tokens or 0" },
  { "common", "an error without the totals", "  if type(err) == \"table\" then self:into(err) end\n", "" },
  { "structured", "limit doubled only", "limit = min(ceiling, max(cur * 2, cur + 256))", "limit = min(ceiling, cur * 2)" },
  { "structured", "no repair re-ask", "  if v == nil then\n    -- one repair re-ask, with the errors",
    "  if false then\n    -- one repair re-ask, with the errors" },
  -- summarize
  { "summarize", "the limit not asked for", "system_for(n, language, o.instructions, with_images)",
    "system_for(n + 5, language, o.instructions, with_images)" },
  { "summarize", "max_tokens not from the words", "local max_tokens = common.max_tokens_for_words(n, model, text:sub(1, 4000))",
    "local max_tokens = 4 * n" },
  { "summarize", "max_output not respected", "if info and info.max_output then max_tokens = min(max_tokens, info.max_output) end", "" },
  { "summarize", "chunks at the final length", "local per = max(60, words)", "local per = words" },
  { "summarize", "groups of one", "if cur_n + n > budget and #cur >= 2 then", "if cur_n + n > budget and cur[1] then" },
  { "summarize", "never chunked", "local chunks = (o.chunk_tokens or count(doc) > budget)", "local chunks = false" },
  { "summarize", "too_long never set", "if n > words then flags.too_long = true end", "" },
  { "summarize", "cut never set", 'if res.finish_reason == "length" then flags.cut = true end', "" },
  { "summarize", "banned never flagged", "if found[1] then flags.banned = found end", "" },
  { "summarize", "images with every call", "local with_images = final and parts ~= nil", "local with_images = parts ~= nil" },
  { "summarize", "images to Hermes", "model, fallback = common.vision_model(model, client.fallback, \"summarize\")",
    "local _ = common.vision_model(model, client.fallback, \"summarize\")" },
  { "summarize", "language always English", "local language = o.language or common.language_of(doc)", 'local language = "en"' },
  { "summarize", "words counted wrong", "return ledger:into({ text = text, words = n,", "return ledger:into({ text = text, words = words," },
  -- generate
  { "generate", "template not rendered", "  local prompt = M.render(o.template, o.vars)\n", "  local prompt = o.template\n" },
  { "generate", "no audience", 'if b.audience then lines[#lines + 1] = "Audience: "', 'if false then lines[#lines + 1] = "Audience: "' },
  { "generate", "banned words not listed", 'if banned[1] then lines[#lines + 1] = "Never use', 'if false then lines[#lines + 1] = "Never use' },
  { "generate", "never regenerated", "    if bad[1] then\n      regenerated = true", "    if false then\n      regenerated = true" },
  { "generate", "regeneration names no words", '"\\nYour previous text used " .. concat(names, ", ")', '"\\nWrite it again."' },
  { "generate", "banned never flagged", "    if b[1] then f.banned = b end\n", "" },
  { "generate", "no max_tokens", "    max_tokens = common.max_tokens_for_words(o.max_words, model, prompt)\n", "" },
  { "generate", "too_long never set", "if o.max_words and common.word_count(t.text) > o.max_words then f.too_long = true end", "" },
  { "generate", "cut never set", "    if t.cut then f.cut = true end\n", "" },
  { "generate", "n not sent", "n = count > 1 and count or nil", "n = nil" },
  { "generate", "all regenerated one at a time", 'local again, err2 = ask(#bad, "', 'local again, err2 = ask(1, "' },
  { "generate", "request() not what is sent", "  if not ok then error(req, 2) end\n  return req",
    "  if not ok then error(req, 2) end\n  req.max_tokens = nil\n  return req" },
  { "generate", "language always English", "local language = o.language or common.language_of(prompt)", 'local language = "en"' },
}

local function sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  local ok, _, code = p:close()
  return ok, out, code
end

local lua = "lua5.4"
local cpath = root .. "/build/?.so"
local scratch = (os.getenv("TMPDIR") or "/tmp") .. "/slm-mutate-documents"
local lpath = scratch .. "/?.lua;" .. root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. root .. "/?.lua"
local function busted()
  return "cd " .. q(root) .. " && timeout 300 " .. lua .. " /usr/bin/busted --lpath=" .. q(lpath) .. " --cpath=" .. q(cpath)
    .. " -o TAP tests/documents_spec.lua"
end

local wanted = {}
for _, a in ipairs(arg) do wanted[tonumber(a)] = true end

local sources = {}
for _, name in ipairs{ "extract", "summarize", "generate", "common", "structured" } do
  sources[name] = H.read_file(root .. "/lua/slm/tasks/" .. name .. ".lua")
end
assert(sh("rm -rf " .. q(scratch) .. " && mkdir -p " .. q(scratch .. "/slm/tasks")))

local _, listing = sh("cd " .. q(root) .. " && " .. lua .. " /usr/bin/busted --lpath=" .. q(lpath) .. " --cpath=" .. q(cpath)
  .. " --list tests/documents_spec.lua")
local specs, failed_once = {}, {}
for name in listing:gmatch("[^\n]*:%d+: ([^\n]+)") do specs[#specs + 1] = name end

local status = 0
for i, m in ipairs(MUTATIONS) do
  if next(wanted) == nil or wanted[i] then
    local file = m[1]
    local text, applies = sources[file], true
    for j = 3, #m, 2 do
      local a = text:find(m[j], 1, true)
      if not a or text:find(m[j], a + 1, true) then
        applies = false
        break
      end
      text = text:sub(1, a - 1) .. m[j + 1] .. text:sub(a + #m[j])
    end
    local line
    if not applies then
      line, status = "DOES NOT APPLY (exactly once)", 1
    elseif not load(text) then
      line, status = "DOES NOT COMPILE", 1
    else
      local path = scratch .. "/slm/tasks/" .. file .. ".lua"
      local f = assert(io.open(path, "wb"))
      f:write(text)
      f:close()
      local _, out, code = sh(busted())
      os.remove(path)
      local failing = {}
      for name in ("\n" .. out):gmatch("\nnot ok %d+ %- ([^\n]+)") do failing[#failing + 1] = name end
      for _, name in ipairs(failing) do failed_once[name] = true end
      if code == 124 then
        line, status = "TIMED OUT (a spec hangs instead of failing)", 1
      elseif #failing == 0 then
        line, status = "BROKE NO SPEC", 1
      else
        line = #failing .. " failing: " .. table.concat(failing, " | "):gsub("slm%.%a+ against the simulator ", ""):sub(1, 150)
      end
    end
    print(("%3d %-10s %-36s %s"):format(i, file, m[2], line))
    io.stdout:flush()
  end
end

if next(wanted) == nil then
  local never = {}
  for _, name in ipairs(specs) do
    if not failed_once[name] then never[#never + 1] = name end
  end
  print(("\n%d specs, %d mutations; %d specs never failed%s"):format(#specs, #MUTATIONS, #never, #never > 0 and ":" or ""))
  for _, name in ipairs(never) do print("  " .. name) end
  if #never > 0 then status = 1 end
end
os.exit(status)
