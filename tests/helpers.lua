-- Shared helpers for the integration specs: one simulator per spec file.
local M = {}

-- tests/fixtures/, wherever busted runs from
M.FIXTURES = (debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./") .. "fixtures/"

-- math.type under Lua 5.4; under LuaJIT (one number type) what it would
-- say of the value: "integer" when integral and in the 64-bit range.
-- float_subtype: false under LuaJIT, where 1.0 and 1 are the same number.
M.float_subtype = math.type ~= nil
function M.math_type(v)
  if math.type then return math.type(v) end
  if type(v) ~= "number" then return nil end
  if v % 1 == 0 and v >= -2 ^ 63 and v < 2 ^ 63 then return "integer" end
  return "float"
end

-- utf8.char for one code point (LuaJIT has no utf8 library)
function M.utf8_char(cp)
  if utf8 then return utf8.char(cp) end
  local f = math.floor
  if cp < 0x80 then return string.char(cp) end
  if cp < 0x800 then return string.char(0xC0 + f(cp / 64), 0x80 + cp % 64) end
  if cp < 0x10000 then return string.char(0xE0 + f(cp / 4096), 0x80 + f(cp / 64) % 64, 0x80 + cp % 64) end
  return string.char(0xF0 + f(cp / 262144), 0x80 + f(cp / 4096) % 64, 0x80 + f(cp / 64) % 64, 0x80 + cp % 64)
end

function M.read_file(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

function M.write_file(path, data)
  local f = assert(io.open(path, "wb"))
  assert(f:write(data))
  assert(f:close())
end

-- Write `data` to a fresh temporary file; returns its path.
function M.write_tmp(data)
  local path = os.tmpname()
  M.write_file(path, data)
  return path
end

function M.upstream()
  local launch = require "tests.upstream.launch"
  return launch.start{ quiet = true }
end

-- A client of the simulator `up`: base_url, a key, gpt-4o-mini and a 10 s
-- timeout, then `defaults`, then `opts` (the spec's own, the test's own).
function M.sim_client(up, opts, defaults)
  local o = { base_url = up.url, api_key = "sk-test-good", model = "gpt-4o-mini", timeout = 10 }
  for k, v in pairs(defaults or {}) do o[k] = v end
  for k, v in pairs(opts or {}) do o[k] = v end
  return require("slm").client(o)
end

-- A client of the simulator `up` for the task specs: no retries, then
-- `opts`; with `scenario` (directives) the X-Sim-Scenario header and an
-- X-Sim-Key of its own, so that fail=N counts this client's attempts only.
local task_keys = 0
function M.task_client(up, opts, scenario)
  local o = { max_retries = 0 }
  for k, v in pairs(opts or {}) do o[k] = v end
  if scenario then
    task_keys = task_keys + 1
    o.headers = { ["X-Sim-Scenario"] = scenario, ["X-Sim-Key"] = ("task-%d-%d-%d"):format(task_keys, os.time(),
      math.random(1e9)) }
  end
  return M.sim_client(up, o)
end

-- { { role = "user", content = text } }
function M.msgs(text, default)
  return { { role = "user", content = text or default or "hello" } }
end

-- A port nothing listens on (bind, learn the port, close).
function M.dead_port()
  return 1 -- port 1 on loopback: connection refused
end

function M.count_keys(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n
end



-- The last request the simulator saw: { headers = {...}, body = {...}, raw_body = "..." }
function M.last(up)
  local f = assert(io.popen("env -u LD_PRELOAD curl -s --max-time 5 http://127.0.0.1:" .. up.port .. "/__sim/last"))
  local s = f:read("a")
  f:close()
  return require("cjson").decode(s)
end
-- Wait (at most `limit` seconds) until the simulator has nothing in
-- flight, calling pump() between looks (to drive the client's loop);
-- returns the last stats.
function M.wait_idle(up, pump, limit)
  local now = require("slm.core").now
  local deadline = now() + (limit or 3)
  local st = up:stats()
  while st.in_flight > 0 and now() < deadline do
    pump()
    st = up:stats()
  end
  return st
end

-- Shell-quote a string.
function M.q(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Start Lua `code` in a fresh process of the interpreter running the specs,
-- with this process's package.path and package.cpath (so the same build of
-- slm.core); `env` ("NAME=value ...", optional) goes before the command.
-- Returns the io.popen handle of its output (stdout and stderr): the
-- process runs alongside this one until that is read.
function M.spawn_lua(code, env)
  local i = -1
  while arg and arg[i - 1] do i = i - 1 end
  local lua = arg and arg[i] or "lua5.4"
  code = ("package.path = %q; package.cpath = %q\n"):format(package.path, package.cpath) .. code
  return assert(io.popen((env and env .. " " or "") .. M.q(lua) .. " -e " .. M.q(code) .. " 2>&1"))
end

-- spawn_lua, waiting for the end: returns what the process wrote.
function M.run_lua(code, env)
  local p = M.spawn_lua(code, env)
  local out = p:read("a")
  p:close()
  return out
end

-- bin/slm in the foreground, `env` ("NAME=value ...") before it, its
-- stderr in dir/stderr and its stdin `stdin` (a string; nothing: /dev/null):
-- stdout, stderr, exit status.
function M.run_slm(env, dir, cmdline, stdin)
  local inf, errf = "/dev/null", dir .. "/stderr"
  if stdin then inf = dir .. "/stdin"; M.write_file(inf, stdin) end
  local p = io.popen(env .. "bin/slm " .. cmdline .. " <" .. inf .. " 2>" .. errf)
  local out = p:read("a")
  local ok, _, code = p:close()
  return out, M.read_file(errf), ok and 0 or code
end

-- A stored history as "role:content" strings, for comparing.
function M.contents(h)
  local out = {}
  for i, m in ipairs(h) do out[i] = m.role .. ":" .. tostring(m.content) end
  return out
end

-- The lines of a file ({} when there is none).
function M.lines_of(path)
  local f = io.open(path, "rb")
  if not f then return {} end
  local t = {}
  for line in f:lines() do t[#t + 1] = line end
  f:close()
  return t
end

-- Wait (up to about 10 s) until the file at path has at least n lines.
function M.wait_lines(path, n, what)
  for _ = 1, 1000 do
    if #M.lines_of(path) >= n then return end
    os.execute("sleep 0.01")
  end
  error(("%s never reached %d lines"):format(what or path, n))
end

-- Occurrences of the plain string `what` in s.
function M.occurrences(s, what)
  local n, i = 0, 1
  while true do
    local a, b = s:find(what, i, true)
    if not a then return n end
    n, i = n + 1, b + 1
  end
end

-- A new temporary directory (mktemp -d): its absolute path.  The caller
-- removes it (os.execute("rm -rf " .. M.q(dir))).
function M.tmpdir()
  local p = assert(io.popen("mktemp -d"))
  local d = p:read("*l")
  p:close()
  assert(d and d:sub(1, 1) == "/", "mktemp -d failed")
  return d
end

-- Run a shell command without the sanitizer runtimes the ASan stage
-- preloads: its output (stdout and stderr) and whether it exited 0.
function M.sh(cmd)
  local p = assert(io.popen("unset LD_PRELOAD ASAN_OPTIONS UBSAN_OPTIONS; " .. cmd .. " 2>&1"))
  local out = p:read("a")
  local ok = p:close()
  return out, ok == true
end

-- npm ci in `dir` (a folder of tests/tools with a package-lock.json)
-- unless its node_modules holds `pkg` and is not older than the lock file;
-- the packages stay for the later stages and runs.  Returns ok, and npm's
-- output when it failed.
function M.npm_ready(dir, pkg)
  local d = M.q(dir)
  local fresh = ("[ -f %s/node_modules/.package-lock.json ] && [ -d %s/node_modules/%s ]"
    .. " && ! [ %s/package-lock.json -nt %s/node_modules/.package-lock.json ]"):format(d, d, pkg, d, d)
  if select(2, M.sh(fresh)) then return true end
  local out, ok = M.sh("npm ci --prefix " .. d .. " --no-audit --no-fund --loglevel=error")
  return ok, out
end

-- The extraction schema the CLI specs use: an object with one string,
-- `order` (the simulator's keyword model fills it from "Order 123").
M.ORDER_SCHEMA = '{"additionalProperties":false,"properties":{"order":{"type":"string"}},'
  .. '"required":["order"],"type":"object"}'

-- The checkout's absolute path (nginx configs need absolute paths).
function M.root()
  return (M.sh("cd " .. M.q(M.FIXTURES .. "../..") .. " && pwd -P"):gsub("%s+$", ""))
end

-- A simulator and an app nginx running lua-slm (tests/upstream/app.conf.in)
-- whose http-level directives name it as @SIM_URL@: sim, app.  opts: more
-- options for the app's start (workers, ...).
function M.sim_and_app(http, server, opts)
  local launch = require "tests.upstream.launch"
  local sim = launch.start{ quiet = true }
  local o = { quiet = true }
  for k, v in pairs(opts or {}) do o[k] = v end
  o.app = { http = http:gsub("@SIM_URL@", sim.url), server = server }
  local ok, app = pcall(launch.start, o)
  if not ok then
    sim:stop()
    error(app, 0)
  end
  return sim, app
end


--- bin/slm in the background, with `env` (a "VAR=value " prefix) and its
-- files in `dir`: a handle with pid, wait() -> exit status, kill(sig),
-- stderr().
function M.spawn_slm(env, dir, cmdline)
  local pidf, rcf = dir .. "/pid", dir .. "/rc"
  os.remove(pidf); os.remove(rcf)
  M.write_file(dir .. "/bg.sh", ("%sbin/slm %s </dev/null >%s/bg.out 2>%s/bg.err &\necho $! >%s\nwait $!\necho $? >%s\n")
    :format(env, cmdline, dir, dir, pidf, rcf))
  assert(os.execute("sh " .. dir .. "/bg.sh 2>/dev/null &"))
  local pid
  for _ = 1, 200 do
    local f = io.open(pidf)
    pid = f and f:read("l")
    if f then f:close() end
    if pid and pid ~= "" then break end
    os.execute("sleep 0.01")
  end
  local h = { pid = assert(tonumber(pid)) }
  function h.wait()
    for _ = 1, 3000 do
      local f = io.open(rcf)
      local rc = f and f:read("l")
      if f then f:close() end
      if rc and rc ~= "" then return tonumber(rc) end
      os.execute("sleep 0.01")
    end
    error("bin/slm did not exit")
  end
  function h.kill(sig) os.execute(("kill -%s %d"):format(sig, h.pid)) end
  function h.stderr() return M.read_file(dir .. "/bg.err") end
  return h
end

--- A client whose replies are scripted (the tasks' specs, no network):
-- each entry of `replies` is a reply text, a Response-like table (text,
-- finish_reason, refusal, usage, cost, no_price, attempts, logprobs,
-- tool_calls, choices), or a function(req, n) -> res | nil, err; the last
-- one answers every call beyond the list.  c.calls holds the requests.
function M.scripted_client(replies, model)
  local c = { model = model or "gpt-4o-mini", fallback = {}, calls = {} }
  function c:chat(req)
    local n = #self.calls + 1
    self.calls[n] = req
    local r = replies[n] or replies[#replies]
    if type(r) == "function" then return r(req, n) end
    if type(r) == "string" then r = { text = r } end
    local res = { text = r.text or "", finish_reason = r.finish_reason or "stop", refusal = r.refusal,
      usage = r.usage or { prompt_tokens = 100, completion_tokens = 20, total_tokens = 120 },
      cost = r.cost == nil and 0.0001 or (r.cost or nil), attempts = r.attempts or 1, logprobs = r.logprobs,
      tool_calls = r.tool_calls or {}, model = self.model }
    if r.no_price then res.cost = nil end
    res.choices = r.choices or { { index = 0, text = res.text, finish_reason = res.finish_reason, tool_calls = res.tool_calls } }
    return res
  end
  return c
end

return M
