-- mutate_csv.lua - can every spec of tests/csv_spec.lua and
-- tests/jsonl_spec.lua fail, and is each way of breaking csrc/csv.c,
-- lua/slm/csv.lua, lua/slm/jsonl.lua and lua/slm/fileio.lua caught?
--
--   lua5.4 tests/tools/mutate_csv.lua          # every mutation
--   lua5.4 tests/tools/mutate_csv.lua 3 12     # only these
--
-- Each mutation (literal replacements, each of a text found exactly once)
-- is applied to a copy of the tree, which is built and whose two specs
-- run there (tests/tools/mutate.lua's run_tree). Prints what each mutation
-- made fail, then the specs no mutation made fail; exits 1 when a mutation
-- broke nothing, no longer applies or a spec never failed. A dev tool:
-- bin/test does not run it (about six seconds a mutation on two cores).
local root = debug.getinfo(1, "S").source:match("^@(.*)/tests/tools/") or "."
package.path = root .. "/?.lua;" .. package.path

local C, CSV, JSONL, IO = "csrc/csv.c", "lua/slm/csv.lua", "lua/slm/jsonl.lua", "lua/slm/fileio.lua"
local INIT = "lua/slm/init.lua"

local MUTATIONS = {
  -- the parser
  { "empty lines are records", C, "      if (c == '\\n') { p->line++; s++; break; }\n      if (c == '\\r') { st = REC_CR",
    "      if (c == '\\n') { start_record(p); st = FIELD_START; break; }\n      if (c == '\\r') { st = REC_CR" },
  { "CRLF empty lines are records", C, "      if (c == '\\n') { p->line++; s++; st = REC_START; break; }",
    "      if (c == '\\n') { start_record(p); st = CR_UNQ; break; }" },
  { "line numbers skip empty lines", C, "      if (c == '\\n') { p->line++; s++; break; }", "      if (c == '\\n') { s++; break; }" },
  { "quoted LF not counted as a line", C, "        if (!append(p, \"\\n\", 1)) goto oom;\n        p->line++;",
    "        if (!append(p, \"\\n\", 1)) goto oom;" },
  { "no quoted fields", C, "      if (c == '\"') { p->quote_line = p->line; st = QUOTED; s++; break; }\n", "" },
  { "doubled quote kept as two", C, "        if (!append(p, \"\\\"\", 1)) goto oom;\n        st = QUOTED;",
    "        if (!append(p, \"\\\"\\\"\", 2)) goto oom;\n        st = QUOTED;" },
  { "quoted separator splits", C, "  p->cls[sep] |= C_UNQ;", "  p->cls[sep] |= C_UNQ | C_QUO;" },
  { "CR of CRLF kept in the field", C, "      } else if (c == '\\r') {\n        st = CR_UNQ;",
    "      } else if (c == '\\r') {\n        if (!append(p, \"\\r\", 1)) goto oom;\n        st = CR_UNQ;" },
  { "bare CR dropped", C, "        if (!append(p, \"\\r\", 1)) goto oom; /* a bare CR is data */\n", "" },
  { "quote in an unquoted field accepted", C, "        fault(p, SLM_CSV_EQUOTE, s - 1);\n        st = SKIP;",
    "        if (!append(p, s - 1, 1)) goto oom;" },
  { "text after a closing quote accepted", C, "        fault(p, SLM_CSV_EAFTERQUOTE, s);\n        st = SKIP;",
    "        st = UNQUOTED;" },
  { "CR then text after a quote accepted", C, "        fault(p, SLM_CSV_EAFTERQUOTE, \"\\r\");\n        st = SKIP;",
    "        st = UNQUOTED;" },
  { "skip ends at the end of the block", C, "      if (!q) { s = end; break; }", "      if (!q) q = end - 1;" },
  { "a fault ends reading", C, "      s = q + 1;\n      emit(p, on_record, ud);\n      p->line++;\n      st = REC_START;",
    "      s = end;\n      emit(p, on_record, ud);" },
  { "faults report the record's line", C, "  p->err_line = code == SLM_CSV_EUNTERMINATED ? p->quote_line : p->line;",
    "  p->err_line = p->rec_line;" },
  { "excerpt without the byte at fault", C, "  if (bad) p->excerpt[n++] = *bad;", "  (void)bad;" },
  { "unterminated quote reported as a record", C, "    fault(p, SLM_CSV_EUNTERMINATED, NULL);\n    emit(p, on_record, ud);",
    "    end_field(p);\n    emit(p, on_record, ud);" },
  { "last record without a line end lost", C, "    if (!end_field(p)) return SLM_CSV_ENOMEM;\n    emit(p, on_record, ud);\n    break;\n  }\n  reset_stream(p);",
    "    break;\n  }\n  reset_stream(p);" },
  { "BOM kept", C, "  p->bom = p->strip_bom ? 0 : -1;", "  p->bom = -1;" },
  { "partial BOM dropped", C, "      if (!run(p, (const char *)BOM, (const char *)BOM + n, on_record, ud)) return SLM_CSV_ENOMEM;\n    }\n  }",
    "      (void)n;\n    }\n  }" },
  { "max_record ignored", C, "  if (p->max_record && n > p->max_record - p->len) {", "  if (0) {" },
  { "records numbered from 0", C, "  r.record = ++p->records;", "  r.record = p->records++;" },
  { "separator ignored", C, "      if (c == sep) {\n        if (!end_field(p)) goto oom;\n        st = FIELD_START;\n      } else if (c == '\\n') {",
    "      if (c == sep && 0) {\n        if (!end_field(p)) goto oom;\n        st = FIELD_START;\n      } else if (c == '\\n') {" },
  { "empty fields merged", C, "      st = UNQUOTED; /* an empty or unquoted field */", "      if (c == sep) { s++; break; }\n      st = UNQUOTED;" },
  { "an empty input is a record", C, "  case REC_CR: /* a CR alone at the end: an empty line */\n    break;",
    "  case REC_CR:\n    start_record(p);\n    end_field(p);\n    emit(p, on_record, ud);\n    break;" },
  { "a CR starting a record dropped", C, "      start_record(p); /* the CR was data of the first field */\n      if (!append(p, \"\\r\", 1)) goto oom;",
    "      start_record(p);" },
  { "spaces special", C, "  p->cls['\\r'] |= C_UNQ;", "  p->cls['\\r'] |= C_UNQ;\n  p->cls[' '] |= C_UNQ;" },
  { "NUL special", C, "  p->cls['\\n'] |= C_UNQ | C_QUO;", "  p->cls['\\n'] |= C_UNQ | C_QUO;\n  p->cls[0] |= C_UNQ;" },
  { "an empty record written", C, "  if (n == 0) return luaL_argerror(L, 1, \"a record needs at least one field\");\n", "" },
  -- the writer's quoting
  { "separator not quoted", C, "    if (c == sep || c == '\"' || c == '\\r' || c == '\\n') return 1;",
    "    if (c == '\"' || c == '\\r' || c == '\\n') return 1;" },
  { "CR not quoted", C, "    if (c == sep || c == '\"' || c == '\\r' || c == '\\n') return 1;",
    "    if (c == sep || c == '\"' || c == '\\n') return 1;" },
  { "edge spaces not quoted", C, "  if (s[0] == ' ' || s[0] == '\\t' || s[n - 1] == ' ' || s[n - 1] == '\\t') return 1;\n", "" },
  { "a lone empty field not quoted", C, "  if (n == 0) return alone;", "  if (n == 0) return 0;" },
  { "quotes not doubled", C, "    if (s[i] == '\"') *out++ = '\"';\n", "" },
  { "everything quoted", C, "  if (n == 0) return alone;", "  return 1;" },
  -- the Lua reader and writer
  { "ragged rows not marked", CSV, "    rec.ragged = true", "    rec.ragged = nil" },
  { "width from the last row", CSV, "  if not width then\n    self._width = #rec", "  if true then\n    self._width = #rec" },
  { "header not skipped by rows()", CSV, "  if self._want_header and self._header == nil then\n    local h, err = self:header()",
    "  if false then\n    local h, err = self:header()" },
  { "header error not given by rows()", CSV, "      header_err = nil\n      return false, e", "      header_err = nil" },
  { "bad records as nil, err", CSV, "  if rec.error then return false, record_error(self, rec) end",
    "  if rec.error then return nil, record_error(self, rec) end" },
  { "bom option ignored", CSV, "o.bom ~= false", "true" },
  { "partial record after a read failure", CSV, "self._q = err and {} or self._p:finish()", "self._q = self._p:finish()" },
  { "file not closed at the end", CSV, "      self._done = true\n      fileio.close_reader(self)", "      self._done = true" },
  { "unterminated error without its advice", CSV, "; nothing after its opening quote could be read", "" },
  { "by_name: the last duplicate wins", CSV, "    if not seen[name] then", "    if true then" },
  { "writer eol default LF", CSV, 'o.eol or "\\r\\n"', 'o.eol or "\\n"' },
  { "writer bom ignored", CSV, "  if o.bom then", "  if false then" },
  { "empty file: no header", CSV, "      self._header = {}", "      self._header = false" },
  { "by_name: extra fields by position", CSV, "      t[name] = row[i]\n    end\n  end\n  return t",
    "      t[name] = row[i]\n    end\n  end\n  for i = #header + 1, #row do t[i] = row[i] end\n  return t" },
  { "slm.jsonl not reachable", INIT, '  jsonl = function() return require("slm.jsonl") end,\n', "" },
  { "rows of any type", IO, '  if type(v) ~= "table" then error(format("%s: row must be a %s, got %s", who, what, type(v)), 3) end\n', "" },
  { "excerpt unbounded", IO, '  if #s > max then s = s:sub(1, max) .. "..." end\n', "" },
  { "errors without the file", IO, '  local where = line and format("%s:%d", file, line) or file',
    '  local where = line and format("%d", line) or ""' },
  { "given files closed by the writer", IO, "  if owned then ok, err = f:close() elseif", "  if true then ok, err = f:close() elseif" },
  { "write errors raised", IO, '  if not ok then return nil, M.input_error("io", name, nil, "cannot write: " .. tostring(err)) end',
    '  if not ok then error(err) end' },
  { "unknown options accepted", IO, "    if not check then error(", "    if not check then return opts end\n    if false then error(" },
  -- JSONL
  { "blank lines not skipped", JSONL, '      local first = find(s, "[^ \\t\\r]")', '      local first = find(s, "[^ \\t\\r]") or 1' },
  { "JSONL BOM kept", JSONL, '      if n == 1 and sub(s, 1, 3) == "\\239\\187\\191" then s = sub(s, 4) end\n', "" },
  { "arrays accepted", JSONL, '        if sub(s, first, first) ~= "{" then', '        if false then' },
  { "last line without LF lost", JSONL, "      if self._n == 0 then return nil end\n      local s = concat(pieces, \"\", 1, self._n)",
    "      if true then return nil end\n      local s = concat(pieces, \"\", 1, self._n)" },
  { "long lines cut at a block", JSONL, "          s = concat(pieces, \"\", 1, self._n + 1)", "          s = pieces[self._n + 1]" },
  { "line numbers skip blank lines", JSONL, "      local n = self._line + 1\n      self._line = n",
    "      local n = self._line + (find(s, \"%S\") and 1 or 0)\n      self._line = n" },
  { "bad line as nil", JSONL, '        return false, fileio.input_error("json", self._name, n, "not valid JSON: " .. why), n',
    '        return nil, fileio.input_error("json", self._name, n, "not valid JSON: " .. why), n' },
  { "partial line after a read failure", JSONL, "        for i = self._n, 1, -1 do pieces[i] = nil end\n        self._n = 0\n        return false",
    "        return false" },
  { "encode errors raised", JSONL, "  local ok, s = pcall(json.encode, v)", "  local ok, s = true, json.encode(v)" },
  { "JSONL writer without the newline", JSONL, '  return fileio.write(self._f, self._name, s .. "\\n")', "  return fileio.write(self._f, self._name, s)" },
}

os.exit(require("tests.tools.mutate").run_tree({
  mutations = MUTATIONS, specs = { "tests/csv_spec.lua", "tests/jsonl_spec.lua" }, scratch = "slm-mutate-csv",
}, arg))
