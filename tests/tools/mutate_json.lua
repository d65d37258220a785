-- mutate_json.lua - is every spec of tests/json_spec.lua able to fail?
--
--   lua5.4 tests/tools/mutate_json.lua          # all mutations
--   lua5.4 tests/tools/mutate_json.lua 3 12     # only these
--
-- Each mutation breaks csrc/json.c (or lua/slm/json.lua) in one way (one
-- or more literal replacements), in a copy of the tree under $TMPDIR; the
-- copy is built and the spec run there.  Prints, for each mutation, the specs that failed; then the
-- specs that no mutation made fail.  Exits 1 when a mutation failed no
-- spec, a patch no longer applies (the code moved on: update the patch),
-- or a spec never failed.  A dev tool: bin/test does not run it (about
-- three minutes on two cores).
local root = debug.getinfo(1, "S").source:match("^@(.*)/tests/tools/") or "."

local M = {
  { "integer branch dropped", "csrc/json.c",
    "    if (lua_isinteger(L, idx)) {\n      put_int(e, lua_tointeger(L, idx));\n      return;\n    }\n", "" },
  { "integral floats not printed as integers", "csrc/json.c",
    "  if (x >= -0x1p63 && x < 0x1p63) {\n    lua_Integer i", "  if (0) {\n    lua_Integer i" },
  { "floats always %.17g", "csrc/json.c", "for (prec = 15; prec <= 17; prec++)", "for (prec = 17; prec <= 17; prec++)" },
  { "floats only %.15g", "csrc/json.c", "if (prec == 17 || strtod(tmp, NULL) == (double)x) break;", "break;" },
  { "locale decimal point kept", "csrc/json.c", "      if (p) *p = '.';", "      (void)p;" },
  { "\\b not escaped short", "csrc/json.c", "    case '\\b': *o++ = 'b'; break;\n", "" },
  { "0x1F copied raw", "csrc/json.c", "  1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, /* 10 */",
    "  1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, /* 10 */" },
  { "E0 A0..BF refused", "csrc/json.c", "  U8ROW(8, 0, 1, 2, 1, 8, 2, 8, 8), /* A0..BF */",
    "  U8ROW(8, 0, 1, 2, 8, 8, 2, 8, 8), /* A0..BF */" },
  { "surrogates accepted", "csrc/json.c", "  U8ROW(8, 0, 1, 2, 1, 8, 2, 8, 8), /* A0..BF */",
    "  U8ROW(8, 0, 1, 2, 1, 1, 2, 8, 8), /* A0..BF */" },
  { "key UTF-8 unchecked", "csrc/json.c", "    bad = put_str(e, en->s, en->len, 1);\n    if (bad) {",
    "    bad = put_str(e, en->s, en->len, 1);\n    if (0) {" },
  { "keys not sorted", "csrc/json.c", "  sort_entries(e->ent + base, n);\n", "  if (0) sort_entries(e->ent + base, n);\n" },
  { "large objects not sorted", "csrc/json.c", "    qsort(v, n, sizeof *v, entry_cmp);\n", "" },
  { "out-of-order arrays not rewound", "csrc/json.c", "      lua_pop(L, 2);\n      e->len = mark;\n      return 0;",
    "      lua_pop(L, 2);\n      (void)mark;\n      return 0;" },
  { "__jsontype ignored", "csrc/json.c", "  lua_pushvalue(L, S_JSONTYPE);\n  lua_rawget(L, -2);", "  lua_pushnil(L);" },
  { "opts empty_array_mt ignored", "csrc/json.c",
    "    else if (!lua_isnil(L, S_EMPTY_MT) && lua_rawequal(L, -1, S_EMPTY_MT)) kind = K_EMPTY_ARRAY;", "" },
  { "json.null as false", "csrc/json.c", "    if (lua_touserdata(L, idx) == NULL) {\n      PUT_LIT(e, \"null\");",
    "    if (lua_touserdata(L, idx) == NULL) {\n      PUT_LIT(e, \"false\");" },
  { "quote not escaped", "csrc/json.c", "  0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 20 \" */",
    "  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 20 \" */" },
  { "stale tables count as ancestors", "csrc/json.c", "  for (i = 0; i < d; i++) {\n    if (e->open[i] == p) {",
    "  for (i = 0; i < MAX_DEPTH; i++) {\n    if (e->open[i] == p) {" },
  { "depth limit 63", "csrc/json.c", "  if (d >= MAX_DEPTH) fail", "  if (d >= MAX_DEPTH - 1) fail" },
  { "nil as nul", "csrc/json.c", "  case LUA_TNIL:\n    PUT_LIT(e, \"null\");", "  case LUA_TNIL:\n    PUT_LIT(e, \"nul\");" },
  { "path without $", "csrc/json.c", "  luaL_addchar(&b, '$');\n", "" },
  { "functions encoded as null", "csrc/json.c", "  default: {\n    char msg[64];",
    "  case LUA_TFUNCTION: PUT_LIT(e, \"null\"); return;\n  default: {\n    char msg[64];" },
  { "no cycle check", "csrc/json.c", "    if (e->open[i] == p) {", "    if (0) {" },
  { "buffer not reset per call", "csrc/json.c", "  e->L = L;\n  e->len = 0;", "  e->L = L;" },
  { "anchored keys fetch the wrong value", "csrc/json.c", "      (void)slm_rawgeti(L, anchor, en->at);",
    "      (void)slm_rawgeti(L, anchor, en->at > 1 ? en->at - 1 : en->at);" },
  { "no busy check", "csrc/json.c", "  if (e->busy) e = new_encoder(L);\n  else lua_pushvalue",
    "  if (0) e = new_encoder(L);\n  else lua_pushvalue" },
  { "json.array without metatable", "lua/slm/json.lua", "    return setmetatable(t, mt)\n", "    return t\n" },
  { "opts unknown accepted", "csrc/json.c", "      if (!k || !opt_names[i])\n", "      if (0)\n" },
  { "sparse arrays accepted", "csrc/json.c", "  if (max != nint) {", "  if (0) {" },
  -- which of the two reports a mixed table gets depends on the hash order,
  -- which Lua 5.4 seeds per process: break both
  { "mixed keys reported as something else", "csrc/json.c",
    "             : \"cannot encode a table with both integer and string keys (integer key %lld)\",",
    "             : \"cannot encode a table with a number key (%lld)\",",
    "fail_key(e, d, \"cannot encode a table with both integer and string keys (string key \"",
    "fail_key(e, d, \"cannot encode a table with a string key (\"" },
}

package.path = root .. "/?.lua;" .. package.path
os.exit(require("tests.tools.mutate").run_tree({
  mutations = M, specs = { "tests/json_spec.lua" }, scratch = "slm-mutate-json",
}, arg))
