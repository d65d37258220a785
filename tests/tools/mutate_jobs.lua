-- mutate_jobs.lua - can every spec of tests/jobs_cli_spec.lua and
-- tests/proc_spec.lua fail, and is each way of breaking the batch runner
-- (lua/slm/jobs.lua), its commands (bin/slm) and csrc/proc.c caught?
--
--   lua5.4 tests/tools/mutate_jobs.lua          # every mutation
--   lua5.4 tests/tools/mutate_jobs.lua 3 12     # only these
--
-- Each mutation (literal replacements, each of a text found exactly once)
-- is applied to a copy of the tree, which is built and whose specs run
-- there (tests/tools/mutate.lua's run_tree). A dev tool: bin/test does not
-- run it (about 30 seconds a mutation on two cores).
local root = debug.getinfo(1, "S").source:match("^@(.*)/tests/tools/") or "."
package.path = root .. "/?.lua;" .. package.path

local J, CLI, C = "lua/slm/jobs.lua", "bin/slm", "csrc/proc.c"

local MUTATIONS = {
  -- keys and the ledger
  { "finished rows sent again", J, 'return rec ~= nil and (rec.status == "ok" or M.FINAL[rec.error_kind] == true)',
    "return false" },
  { "the model not in the key", J, 'model = job.model or ""', 'model = ""' },
  { "the task definition not in the key", J, 'version = job.version or ""', 'version = ""' },
  { "rows with one key sent twice", J,
    "    if not row.bad and not seen[row.key] and not (ledger and ledger:final(row.key)) then",
    "    if not row.bad and not (ledger and ledger:final(row.key)) then" },
  { "a torn line glued to the next record", J, '    if torn then fh:write("\\n") end\n', "" },
  { "ledger records left in the buffer", J, '  assert(fh:write(json.encode(rec) .. "\\n"))\n  fh:flush()',
    '  assert(fh:write(json.encode(rec) .. "\\n"))' },
  { "output not rebuilt when done before", J, "    local rec = not row.bad and job.ledger_done[row.key]",
    "    local rec = not row.bad and job.ledger_done[row.key] and job.ledger_done[row.key].t" },
  -- a finished job
  { "a stopped job marked complete", J,
    "  if self.stamp and self.ledger_path and not stopped then self:mark_complete(s) end",
    "  if self.stamp and self.ledger_path then self:mark_complete(s) end" },
  { "the output's size not checked", J,
    "  if not output or file_size(output) ~= rec.output_size then return nil end\n", "" },
  { "the input not in the stamp", CLI, "      parts.files[i] = slm.core.sha256(f:read(\"a\"))",
    "      parts.files[i] = \"\" f:read(\"a\")" },
  -- stopping
  { "signals not looked at", J, '      if core.trapped() then stopped = "interrupted" break end\n', "" },
  { "budget refusals recorded as errors", J, '      if type(err) == "table" and err.kind == "budget" then',
    "      if false then" },
  { "interrupted exits 0", J, 'if stopped == "interrupted" then code = M.EXIT.interrupted', 'if stopped == "interrupted" then code = 0' },
  { "failed rows exit 0", J, "  elseif s.failed > 0 or s.output_error then code = M.EXIT.failed end", "  end" },
  { "the signal not recorded", C, "  trapped = sig;", "  trapped = 0;" },
  { "a second signal ignored", C, "    signal(sig, SIG_DFL);\n    raise(sig);\n", "" },
  { "fsync a no-op that fails", C, "  if (fflush(p->f) != 0 || fsync(fileno(p->f)) != 0) {", "  if (1) {" },
  -- rows
  { "ragged rows sent", J, "        if rec.ragged then", "        if false then" },
  { "missing id column not checked", J, "      elseif o.id_column and row.fields[o.id_column] == nil then",
    "      elseif false then" },
  { "refused-here rows counted as requests", J, "        if not here then s.sent = s.sent + 1 end", "        s.sent = s.sent + 1" },
  -- the usage log and the dry run
  { "usage log without the cost", J, "tokens = p + c, cost = info.cost or 0,", "tokens = p + c, cost = 0," },
  { "usage log with the key", J, "    outcome = outcome, id = id, prompt = prompt,", "    outcome = outcome, id = id, prompt = prompt, key = job.task," },
  { "prompts logged unasked", J, "        self.log_prompts and (type(row.input)", "        true and (type(row.input)" },
  { "dry run sends", CLI, "  if a.dry_run then\n    dry_run(job, ad, model_list)", "  if false then\n    dry_run(job, ad, model_list)" },
  { "dry run counts done rows", J, "      ledger = M.ledger(self.ledger_path, { read_only = true })", "      ledger = nil" },
  -- output
  { "result columns not renamed on a clash", J, '    local as = have[n] and "slm_" .. n or n', "    local as = n" },
  { "no running cost on the bar", "lua/slm/progress.lua", '  if self.cost then s = s .. format("  $%.4f", self.cost) end\n', "" },
  { "plain progress lines never written", J, "        elseif next_plain and core.now() >= next_plain then",
    "        elseif false then" },
  { "compare: tasks over the context not counted", CLI, "      if not t.fits then o.over_context = o.over_context + t.count end\n", "" },
  { "compare --measure sends nothing", CLI, "    if a.measure then\n      for k, v in pairs(measure(", "    if false then\n      for k, v in pairs(measure(" },
  { "chat forgets the replies", CLI, '        history[#history + 1] = { role = "assistant", content = res.text }\n', "" },
  { "chat /reset keeps the history", CLI, '    if line == "/reset" then', '    if line == "/nope" then' },
  { "usage errors exit 1", CLI, "  os.exit(jobs.EXIT.usage)\nend", "  os.exit(1)\nend" },
}

os.exit(require("tests.tools.mutate").run_tree({
  mutations = MUTATIONS, specs = { "tests/jobs_cli_spec.lua", "tests/proc_spec.lua" }, scratch = "slm-mutate-jobs",
}, arg))
