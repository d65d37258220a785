-- examples/lib/backend.lua: what every example does around its job: pick
-- the endpoint (a real one from the environment, else the bundled local
-- simulator), run the job, always stop the simulator, print the report.
--
--   local backend = require "examples.lib.backend"
--   os.exit(backend.main("ticket_triage", usage_lines, function(b, argv) ... return ok, report end, arg))
--
-- b: { base_url, api_key, model, upstream (the simulator started here, or
-- nil), simulated (true against the simulator: its token counts are 4
-- bytes per token, so costs are an illustration) }.
-- Environment: SLM_API_KEY or OPENAI_API_KEY, SLM_BASE_URL (else
-- OPENAI_BASE_URL, else OpenAI's public API), SLM_MODEL (default_model).
-- With none of SLM_API_KEY, OPENAI_API_KEY, SLM_BASE_URL set, the local
-- simulator from tests/upstream is started on 127.0.0.1.
local M = {}

local function getenv_nonempty(name)
  local v = os.getenv(name)
  if v and v ~= "" then return v end
end

--- The endpoint to use, said on the first line of output.
function M.choose(name, default_model)
  local key = getenv_nonempty("SLM_API_KEY") or getenv_nonempty("OPENAI_API_KEY")
  local base = getenv_nonempty("SLM_BASE_URL")
  local model = getenv_nonempty("SLM_MODEL") or default_model or "gpt-4o-mini"
  if key or base then
    base = base or getenv_nonempty("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    print(("%s: using %s (model %s)"):format(name, base, model))
    io.stdout:flush()
    return { base_url = base, api_key = key, model = model,
      simulated = base:find("^http://127%.0%.0%.1[:/]") ~= nil }
  end
  local upstream = require "tests.upstream.launch"
  -- stopped by main(); and, should this process end without it (SIGTERM,
  -- SIGKILL), by a watcher the launcher leaves
  local stat = io.open("/proc/self/stat", "rb")
  local self_pid = stat and tonumber(stat:read("a"):match("^(%d+)"))
  if stat then stat:close() end
  local up = upstream.start { quiet = true, owner_pid = self_pid }
  print(("%s: no OPENAI_API_KEY/SLM_BASE_URL set — using the local simulator at %s"):format(name, up.url))
  io.stdout:flush()
  return { base_url = up.url, api_key = "sk-local-simulator", model = model, upstream = up, simulated = true }
end

--- The cost line's note: simulated, or no prices known.
function M.cost_line(b, cost, tokens, model)
  local slm = require "slm"
  local note = ""
  if cost == 0 and tokens > 0 and not slm.models[model or b.model] then
    note = ("    (no prices known for model %s)"):format(model or b.model)
  elseif b.simulated then
    note = (" (the simulator's token counts at %s's prices, not a real bill)"):format(model or b.model)
  end
  return ("cost:         $%.6f%s%s"):format(cost, b.simulated and " simulated" or "", note)
end

--- 12345 -> "12,345"
function M.fmt_count(n)
  local s = tostring(math.floor(n))
  local out = s:reverse():gsub("(%d%d%d)", "%1,"):reverse()
  return (out:gsub("^,", ""))
end

--- Run `job(b, argv) -> ok, report` with the endpoint chosen; the report is
--- printed after the simulator is stopped (so a reader that goes away
--- early, `| head`, cannot leave one running).  -> exit status: 0 when ok,
--- 1 when not or on an error, 130 on Ctrl-C.
function M.main(name, usage, job, argv, default_model)
  argv = argv or {}
  if argv[1] == "-h" or argv[1] == "--help" then
    for _, l in ipairs(usage) do print(l) end
    print("env:   OPENAI_API_KEY / SLM_API_KEY, SLM_BASE_URL, SLM_MODEL (default " .. (default_model or "gpt-4o-mini")
      .. ");")
    print("       with none of the first three set, a local simulator on 127.0.0.1 is used")
    return 0
  end
  local got, b = pcall(M.choose, name, default_model)
  if not got then
    io.stderr:write(name, ": cannot start the local simulator: ", tostring(b), "\n")
    return 1
  end
  local interrupted = false
  local ok, all_ok, report = xpcall(job, function(e)
    if type(e) == "string" and e:find("interrupted!$") then -- Ctrl-C
      interrupted = true
      return "interrupted"
    end
    -- our own errors are plain messages; anything else gets a traceback
    if type(e) == "string" and not e:find("^[^\n]-:%d+: ") then return e end
    return debug.traceback(tostring(e), 2)
  end, b, argv)
  if b.upstream then
    local stopped, stop_err = pcall(b.upstream.stop, b.upstream)
    if not stopped then io.stderr:write(name, ": stopping the simulator: ", tostring(stop_err), "\n") end
  end
  if not ok then
    io.stderr:write(name, ": ", tostring(all_ok), "\n")
    return interrupted and 130 or 1
  end
  -- a report that cannot be written (a full disk, a closed pipe) is a failure
  local wok, werr = io.stdout:write(report or "")
  if wok then wok, werr = io.stdout:flush() end
  if not wok then
    io.stderr:write(name, ": cannot write the report: ", tostring(werr), "\n")
    return 1
  end
  return all_ok and 0 or 1
end

--- The command line: options `--name VALUE` of `spec` (name = "count": a
--- whole number >= 1, name = "string"; with a `defaults` value when not
--- given), and the other words as o.args.  Raises a plain message on an
--- unknown option or a bad value.
function M.parse_args(argv, spec, defaults)
  local o, i = { args = {} }, 1
  for k, v in pairs(defaults or {}) do o[k] = v end
  while argv[i] do
    local a = argv[i]
    local name = a:match("^%-%-(.+)$")
    if name then
      local key = name:gsub("%-", "_")
      local kind, v = spec[key], argv[i + 1]
      if not kind then error("unknown option " .. a .. " (see --help)", 0) end
      if v == nil then error(a .. " needs a value", 0) end
      if kind == "count" then
        v = tonumber(v)
        if not v or v < 1 or v % 1 ~= 0 then error(a .. " needs a whole number of at least 1", 0) end
      end
      o[key] = v
      i = i + 2
    else
      o.args[#o.args + 1] = a
      i = i + 1
    end
  end
  return o
end

--- The headers of --sim DIRECTIVES: the simulator's scenario, with one
--- X-Sim-Key for the whole run (so fail=N breaks its first N requests);
--- nil without directives.  Raises when the backend is not the simulator.
function M.sim_headers(b, name, directives)
  if not directives then return nil end
  if not b.simulated then error("--sim works against the simulator only", 0) end
  return { ["X-Sim-Scenario"] = directives, ["X-Sim-Key"] = ("%s-%d-%d"):format(name, os.time(), math.random(1e9)) }
end

--- A text on one line (white space runs as one space), cut to n columns.
function M.one_line(s, n)
  s = tostring(s or ""):gsub("%s+", " "):gsub("^ ", ""):gsub(" $", "")
  return n and require("examples.lib.table_fmt").truncate(s, n) or s
end

--- Lines of a JSON-lines file, decoded (blank lines skipped).
function M.read_jsonl(path)
  local json = require "slm.json"
  local f, err = io.open(path, "rb")
  if not f then error("cannot read " .. tostring(err), 0) end
  local out, n = {}, 0
  for line in f:lines() do
    n = n + 1
    if line:find("%S") then
      local ok, v = pcall(json.decode, line)
      if not ok or type(v) ~= "table" then f:close(); error(("%s:%d: not a JSON object"):format(path, n), 0) end
      out[#out + 1] = v
    end
  end
  f:close()
  return out
end

function M.read_file(path)
  local f, err = io.open(path, "rb")
  if not f then error("cannot read " .. tostring(err), 0) end
  local s = f:read("a")
  f:close()
  return s
end

return M
