-- mutate_schema.lua - can every spec of tests/schema_spec.lua fail?
--
--   lua5.4 tests/tools/mutate_schema.lua         # every mutation
--   lua5.4 tests/tools/mutate_schema.lua 4 17    # only these
--   SLM_LUA=luajit lua5.4 tests/tools/mutate_schema.lua   # the specs under LuaJIT (build-jit/)
--
-- A mutation breaks lua/slm/schema.lua in one way (literal replacements);
-- the broken copy goes to a scratch directory that comes first on the
-- spec's package.path, the rest of lua/ is used as it is. Prints what each
-- mutation made fail, then the specs no mutation made fail. A mutation
-- with `only` runs just the specs it names, under a time limit: one that
-- makes the matcher slow counts as failing them when it runs out of time.
-- Exits 1 when a mutation broke nothing, no longer applies (the code moved
-- on: update it) or a spec never failed. A dev tool: bin/test does not
-- run it. The runner is tests/tools/mutate.lua.
local root = debug.getinfo(1, "S").source:match("^@(.*)/tests/tools/") or "."
package.path = root .. "/?.lua;" .. package.path

local LINEAR = "takes time linear in the string"
local MUTATIONS = {
  -- values and types
  { "null reported as nil", 'if kind == "null" then return "null" end', 'if kind == "null" then return "nil" end' },
  { "nullable adds no null", "if not set.null then set.null = true;", "if false then set.null = true;" },
  { "integer takes any number", "if kind == \"number\" then pass = types.integer and floor(v) == v",
    "if kind == \"number\" then pass = types.integer" },
  { "infinities are numbers", 'kind = (v == v and v ~= huge and v ~= -huge) and "number" or "nonfinite"',
    'kind = (v == v) and "number" or "nonfinite"' },
  { "{} only an object", 'elseif kind == "empty" then pass = types.array or types.object end',
    'elseif kind == "empty" then pass = types.object end' },
  { "json.array() is an object too", 'if jt == "array" or mt == CJ_ARRAY_MT', 'if mt == CJ_ARRAY_MT' },
  { "sparse tables are arrays", 'return c == n and "array" or "mixed"', 'return "array"' },
  { "keys not checked for objects", '    if type(k) ~= "string" then return "mixed" end\n  end\n  return "object"',
    '  end\n  return "object"' },
  -- objects
  { "required never missing", "        if v[k] == nil then\n          if ctx.stop then return false end",
    "        if false then\n          if ctx.stop then return false end" },
  { "a null is missing", "        if v[k] == nil then\n          if ctx.stop then return false end",
    "        if v[k] == nil or v[k] == NULL then\n          if ctx.stop then return false end" },
  { "additionalProperties false ignored", "          if addl == false then\n            if ctx.stop",
    "          if addl == true then\n            if ctx.stop" },
  { "additionalProperties schema ignored", "          elseif not descend(addl, v[k], k, ctx) then", "          elseif false then" },
  { "one error too many", "  if n > ctx.max then", "  if n > ctx.max + 1 then" },
  { "1-based indices", "if not descend(items, v[i], i - 1, ctx) then", "if not descend(items, v[i], i, ctx) then" },
  { "non-identifiers after a dot", "  if is_ident(k) then return \".\" .. k end", "  if true then return \".\" .. k end" },
  { "keys not escaped", "  return '\"' .. gsub(s, '[%c\"\\\\]', esc_char) .. '\"'", "  return '\"' .. s .. '\"'" },
  { "properties not in byte order", "    local map, names = {}, sorted_keys(props)",
    "    local map, names = {}, {}\n    for k in pairs(props) do names[#names + 1] = k end\n    table.sort(names, function(a, b) return a > b end)" },
  -- enum, const, arrays, numbers, strings
  { "enum tables equal by identity", "          if json_equal(list[i], v) then hit = true; break end",
    "          if list[i] == v then hit = true; break end" },
  { "enum lists every value", "    if i <= 10 then shown[i] = show(x) end", "    shown[i] = show(x)" },
  { "const tables by identity", "    if not (c == v or (type(c) == \"table\" and json_equal(c, v))) then",
    "    if not (c == v) then" },
  { "tables shown by kind", "    if ok then return #text > 60", "    if false then return #text > 60" },
  { "minimum counts off by one", "  if mn and n < mn then\n    if ctx.stop then return false end", "  if mn and n <= mn then\n    if ctx.stop then return false end" },
  { "items unchecked", "    if items then\n      for i = 1, n do", "    if false then\n      for i = 1, n do" },
  { "exclusiveMinimum inclusive", 'elseif rel == ">" then miss = v <= m', 'elseif rel == ">" then miss = v < m' },
  { "maximum not checked", 'elseif rel == "<=" then miss = v > m', 'elseif rel == "<=" then miss = false' },
  { "multipleOf exact", "abs(q - floor(q + 0.5)) > 1e-9", "abs(q - floor(q + 0.5)) > 0" },
  { "lengths in bytes", "    if b < 0x80 or b >= 0xC0 then n = n + 1 end", "    n = n + 1" },
  { "length shortcut wrong", "(mn and nb < mn * 4)", "(mn and nb < mn)" },
  { "message strings uncut", "  if #s > 40 then\n    local cut", "  if false then\n    local cut" },
  -- patterns
  { "patterns anchored", "P.anchored = (tree.t == \"bol\")", "P.anchored = true or (tree.t == \"bol\")" },
  { ". matches newlines", "hit = c ~= 10 and c ~= 13", "hit = c ~= 13" },
  { "bytes, not code points", "    if c >= 0x80 then c, ni = utf8_at(s, i, c) end", "" },
  { "$ before a final newline", "      if i <= len then return false end", "      if i < len then return false end" },
  { "negated classes not negated", "    ascii[c] = inside ~= neg", "    ascii[c] = inside" },
  { "\\s is ASCII", "0xA0, 0xA0, 0x1680, 0x1680, 0x2000, 0x200A, 0x2028, 0x2029,", "" },
  { "\\D is \\d", "        return nil, complement(RANGES[lo])", "        return nil, RANGES[lo]" },
  { "{n,m} one short", "      for _ = node.min + 1, node.max do", "      for _ = node.min + 2, node.max do" },
  { "alternation takes the first only", "        P.y[split] = #P.op + 1\n      else", "        P.y[split] = split\n      else" },
  { "ranges unsorted", "  sort(pairs_, function(a, b) return a[1] < b[1] end)", "" },
  { "backreferences as unknown escapes", "      if find(e, \"%d\") then fail(\"backreferences are not supported\", at) end", "" },
  { "lone { accepted", "      if not lo then fail(\"a lone { (escape it as \\\\{)\", q) end",
    "      if not lo then return { t = \"cat\", list = { a, { t = \"char\", c = 123 } } } end" },
  { "positions from 0", "local function fail(msg, at) error({ re_error = msg, pos = at or pos }, 0) end",
    "local function fail(msg, at) error({ re_error = msg, pos = (at or pos) - 1 }, 0) end" },
  { "states not deduplicated", "    if mark[pc] == gen then return false end\n    mark[pc] = gen",
    "    mark[pc] = gen", only = LINEAR },
  { "pattern errors without the path", "    if not re then bad(path, format(", "    if not re then error(format(" },
  -- anyOf, oneOf, allOf
  { "no errors from the one alternative of the type", "  if #compat == 1 then", "  if #compat == -1 then" },
  { "alternatives' paths dropped", "(e.path ~= here and e.path .. \": \" or \"\")", "\"\"" },
  { "union types in reverse", "    for i = 1, #branches do\n      local _, names = eff_types(branches[i])",
    "    for i = #branches, 1, -1 do\n      local _, names = eff_types(branches[i])" },
  { "oneOf takes several", "          if first then second = i; break end", "          if false then second = i; break end" },
  { "anyOf failure unreported", "        ok = false\n        report_union(list, \"anyOf\", v, kind, ctx)",
    "        return false" },
  { "allOf ignored", "    local list = node.all_of", "    local list = nil" },
  -- $ref
  { "$ref replaces its siblings", "  if ref and not check(ref, v, ctx) then", "  if ref then return check(ref, v, ctx) end\n  if false then" },
  { "pointer escapes not undone", 'seg = gsub(gsub(seg, "~1", "/"), "~0", "~")', 'seg = gsub(seg, "~0", "~")' },
  { "pointers without percent-decoding", '    seg = gsub(seg, "%%(%x%x)", function(h) return char(tonumber(h, 16)) end)\n', "" },
  { "pointers without indices", "      if is_list(t) and find(seg, \"^%d+$\") then", "      if false then" },
  { "no depth limit", "local MAX_DEPTH = 200", "local MAX_DEPTH = 400" },
  { "no cycle check", "  for i = 1, #C.nodes do visit(C.nodes[i]) end", "" },
  -- compile
  { "readOnly unsupported", "deprecated = true, readOnly = true, writeOnly = true }\nlocal ROOT_ONLY",
    "deprecated = true, writeOnly = true }\nlocal ROOT_ONLY" },
  { "false is true", "  if s == false then return NEVER end", "  if s == false then return EMPTY end" },
  { "root-only keywords anywhere", "(ROOT_ONLY[k] and s == C.root)", "ROOT_ONLY[k]" },
  { "unknown keywords in hash order", "    sort(unknown)\n", "" },
  { "required elements unchecked", "      if type(req[i]) ~= \"string\" then bad(path, \"'required' must be a list of strings\") end\n", "" },
  { "draft-4 booleans accepted", "  if type(v) == \"boolean\" and (k == \"exclusiveMinimum\"", "  if false and (k == \"exclusiveMinimum\"" },
  { "unused definitions unchecked", "      for i = 1, #names do build(C, defs[names[i]], path .. step_str(k) .. step_str(names[i])) end", "" },
  { "errors raised at the wrong level", "  if getmetatable(e) == SchemaError then error(e.msg, level + 1) end",
    "  if getmetatable(e) == SchemaError then error(e.msg, level) end" },
  { "options unchecked", "        error(\"slm.schema.compile: unknown option '\" .. tostring(k) .. \"'\", 0)", "" },
  { "errors left from the last call", "  ctx.errs, ctx.depth, ctx.stop, ctx.max = nil, 0, false, self.max_errors",
    "  ctx.depth, ctx.stop, ctx.max = 0, false, self.max_errors", "  local errs = ctx.errs\n  ctx.errs = nil\n", "  local errs = ctx.errs\n" },
  { "validators not cached", "  if type(s) == \"table\" then cache[s] = v end", "" },
  { "no keyword in errors", "  errs[n] = { path = render(ctx), message = message, keyword = keyword }",
    "  errs[n] = { path = render(ctx), message = message }" },
  -- parse_lenient
  { "scalars refused", "  if ok and v ~= nil then return v end", "  if ok and type(v) == \"table\" then return v end" },
  { "only unmarked fences", '    if tag == "" or find(tag, "^json") then', '    if tag == "" then' },
  { "fence tag case-sensitive", "    local tag = lower(trim(sub(s, b + 1, eol - 1)))", "    local tag = trim(sub(s, b + 1, eol - 1))" },
  { "no arrays amid prose", '    local i = find(s, "[{%[]", p)', '    local i = find(s, "{", p)' },
  { "escaped quotes end strings", "          r = e + 2", "          r = e + 1" },
  { "brackets in strings count", "    if c == 34 then -- a string", "    if false then -- a string" },
  { "a value must end the reply", "      if depth == 0 then return q, commas end", "      if depth == 0 and q == #s then return q, commas end" },
  { "trailing commas only right before", '"^[ \\t\\r\\n]*[}%]]", q + 1', '"^[}%]]", q + 1' },
  { "trailing commas kept", "  if not commas then return sub(s, i, j) end", "  if true then return sub(s, i, j) end" },
  { "BOM kept", '  if sub(s, 1, 3) == "\\239\\187\\191" then s = sub(s, 4) end', "" },
  { "pieces of a cut value taken", "        return nil, first_err or format(\"the JSON value at character %d of the reply never ends",
    "        p = i + 1\n        local _ = first_err or format(\"the JSON value at character %d of the reply never ends" },
  { "pieces of a broken value taken", "      first_err = first_err or format(\"the JSON value at character %d of the reply does not parse: %s\", i + off, err)\n      p = j + 1",
    "      first_err = first_err or format(\"the JSON value at character %d of the reply does not parse: %s\", i + off, err)\n      p = i + 1" },
  { "gives up after one bad stretch", "      first_err = first_err or format(\"the JSON value at character %d of the reply does not parse: %s\", i + off, err)\n      p = j + 1",
    "      first_err = first_err or format(\"the JSON value at character %d of the reply does not parse: %s\", i + off, err)\n      do return nil, first_err end" },
  { "decoder message lost", "of the reply does not parse: %s\", i + off, err)", "of the reply does not parse\", i + off, err)" },
  -- for_openai_strict, from_openai_strict
  { "objects left open", "    out.additionalProperties = false\n", "" },
  { "required not sorted", "    local names = sorted_keys(props)\n    local req = {}",
    "    local names = {}\n    for k in pairs(props) do names[#names + 1] = k end\n    table.sort(names, function(a, b) return a > b end)\n    local req = {}" },
  { "optional properties not nullable", "        out.properties[name] = nullable_form(out.properties[name])", "" },
  { "null not in enums", "  if out.enum then out.enum[#out.enum + 1] = NULL end", "" },
  { "the caller's table changed", "    elseif not DROP[k] then\n      out[k] = deep_copy(v)", "    elseif not DROP[k] then\n      out[k] = v" },
  { "oneOf kept", "      out.anyOf = list", "      out[k] = list" },
  { "anyOf always wrapped", "  if out.anyOf then\n    out.anyOf[#out.anyOf + 1]", "  if false then\n    out.anyOf[#out.anyOf + 1]" },
  { "all formats kept", "      if OPENAI_FORMATS[v] then out.format = v end", "      out.format = v" },
  { "annotations kept", "local DROP = { examples = true,", "local DROP = { examplez = true," },
  { "siblings of $ref kept", "  while raw[\"$ref\"] ~= nil and has_siblings(raw) do raw = inline_ref(raw, path, X) end", "" },
  { "allOf kept", "  if raw.allOf then raw = merge_all_of(raw, path, X) end", "" },
  { "objects without properties allowed", "    if props == nil then\n      cannot(", "    if false then\n      cannot(" },
  { "maps allowed", "    if addl ~= nil and addl ~= false then\n      cannot(", "    if false then\n      cannot(" },
  { "any root", "    if not plain_object or top.nullable == true then", "    if false then" },
  { "required empty list is an object", "    out.required = json.array(names)", "    out.required = names" },
  { "nulls that the schema takes removed", "and not test(V, pnode, NULL) then v[name] = nil end", "then v[name] = nil end" },
  { "required nulls removed", "        if not (rset and rset[name]) and not test", "        if not test" },
  { "$ref not followed when stripping", "  if node.ref then strip(V, node.ref, v, depth + 1) end", "" },
  { "anyOf not followed when stripping", "      if b then strip(V, b, v, depth + 1) end", "" },
  { "arrays not followed when stripping", "    for i = 1, #v do strip(V, node.items, v[i], depth + 1) end", "" },
}

local lua = os.getenv("SLM_LUA") or "lua5.4"
os.exit(require("tests.tools.mutate").run({
  module = "slm/schema.lua", spec = "tests/schema_spec.lua", mutations = MUTATIONS,
  scratch = "slm-mutate-schema", strip = "slm%.schema ", timeout = 60,
  lua = lua, cpath = root .. (lua == "luajit" and "/build-jit/?.so" or "/build/?.so"),
}, arg))
