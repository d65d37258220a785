-- tests/upstream/launch.lua: start and stop the test upstream (nginx +
-- lua-nginx-module serving sim.lua on 127.0.0.1). A Lua 5.4 module and a CLI.
--
--   local upstream = require "tests.upstream.launch"
--   local up = upstream.start{ port = nil, quiet = true }
--   up.url          -- "http://127.0.0.1:PORT/v1"
--   up:stats()      -- decoded GET /__sim/stats
--   up:reset()      -- POST /__sim/reset
--   up:stop()       -- stop nginx, wait for it, remove the prefix directory
--
--   lua5.4 tests/upstream/launch.lua start [port] [--workers N]
--                                                   -- prints url and prefix
--   lua5.4 tests/upstream/launch.lua stop <prefix>
--
-- Needs: the nginx binary with ndk + lua-nginx-module (as Debian's
-- libnginx-mod-http-lua provides), the curl CLI, lua-cjson; the openssl CLI for tls.

local M = {}

local PORT_MIN, PORT_MAX = 20000, 45000
local BIND_TRIES = 20

-- Shell and file helpers ----------------------------------------------------

local function q(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Run a shell command; returns its output (stdout and stderr) and whether
-- it exited 0.
-- The test runner may preload sanitizer runtimes (LD_PRELOAD) for the Lua
-- process under test; nginx and curl must not inherit them. Nor may nginx
-- inherit Lua 5.4's module paths (e.g. from `eval $(luarocks path)`): its
-- LuaJIT takes LUA_PATH / LUA_CPATH as its own and would load 5.4's cjson.so.
local CLEAN = "unset LD_PRELOAD ASAN_OPTIONS UBSAN_OPTIONS LUA_PATH LUA_CPATH LUA_INIT; "

-- The command's output and whether it exited 0.  The status is echoed by
-- the shell: LuaJIT's popen close() returns true whatever the exit status
-- (Lua 5.1 semantics), which made a failed nginx start look like a success.
local function run(cmd)
  local p = assert(io.popen(CLEAN .. "( " .. cmd .. "\n) 2>&1; echo \"@rc=$?\"", "r"))
  local out = p:read("a")
  p:close()
  local rc = out:match("@rc=(%d+)%s*$")
  return (out:gsub("@rc=%d+%s*$", "")), rc == "0"
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local function write_file(path, data)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

local function tail(s, lines)
  if not s or s == "" then return "(empty)" end
  local all = {}
  for line in s:gmatch("[^\n]+") do all[#all + 1] = line end
  return table.concat(all, "\n", math.max(1, #all - lines + 1))
end

-- Where things are ------------------------------------------------------------

local function this_dir()
  local src = debug.getinfo(1, "S").source
  local path = src:sub(1, 1) == "@" and src:sub(2) or "tests/upstream/launch.lua"
  return path:match("^(.*)/[^/]*$") or "."
end

-- This directory is tests/upstream in a checkout, or where `cmake --install`
-- put the simulator's files (<prefix>/share/lua-slm/sim); the recorded
-- streams that `replay` sends exist in a checkout only.
local paths -- { upstream = abs dir of this file, root = repo root, or this dir when installed }
local function locate()
  if paths then return paths end
  local out, ok = run("cd " .. q(this_dir()) .. " && pwd -P && cd ../.. && pwd -P")
  local up, root = out:match("^([^\n]+)\n([^\n]+)")
  if not ok or not up then error("upstream: cannot locate tests/upstream: " .. out, 0) end
  if not exists(root .. "/tests/upstream/launch.lua") then root = up end
  paths = { upstream = up, root = root }
  return paths
end

local nginx_info -- cached facts about the nginx binary

local function find_nginx(explicit)
  local candidates = {
    explicit, os.getenv("SLM_NGINX"),
    "/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx",
    "/usr/local/openresty/nginx/sbin/nginx",
  }
  for i = 1, 6 do
    local c = candidates[i]
    if c and c ~= "" and exists(c) then return c end
  end
  local out, ok = run("command -v nginx")
  if ok and out:match("%S") then return (out:gsub("%s+$", "")) end
  error("upstream: nginx not found (set SLM_NGINX to its path)", 0)
end

-- load_module lines for ndk and lua-nginx-module, with absolute paths:
-- from /etc/nginx/modules-enabled, else straight from the modules dir.
local function module_lines(info)
  if info.static_lua then return "" end
  local wanted = {}
  local enabled = "/etc/nginx/modules-enabled"
  local listing = run("ls -1 " .. q(enabled) .. " 2>/dev/null")
  for name in listing:gmatch("[^\n]+") do
    local conf = read_file(enabled .. "/" .. name) or ""
    for path in conf:gmatch("load_module%s+([^;%s]+)%s*;") do
      path = path:gsub("^[\"']", ""):gsub("[\"']$", "")
      if path:find("ndk", 1, true) or path:find("lua", 1, true) then
        if path:sub(1, 1) ~= "/" then
          local resolved = info.prefix .. "/" .. path
          if not exists(resolved) then resolved = info.modules .. "/" .. path:match("[^/]+$") end
          path = resolved
        end
        wanted[#wanted + 1] = path
      end
    end
  end
  if #wanted == 0 then
    for _, so in ipairs({ "ndk_http_module.so", "ngx_http_lua_module.so" }) do
      local path = info.modules .. "/" .. so
      if exists(path) then wanted[#wanted + 1] = path end
    end
  end
  if #wanted == 0 then
    error("upstream: lua-nginx-module not found (no load_module for it in " .. enabled
      .. " nor in " .. info.modules .. ")", 0)
  end
  -- ndk must be loaded before the lua module
  table.sort(wanted, function(a, b)
    local an, bn = a:find("ndk", 1, true) and 0 or 1, b:find("ndk", 1, true) and 0 or 1
    if an ~= bn then return an < bn end
    return a < b
  end)
  local lines = {}
  for _, p in ipairs(wanted) do lines[#lines + 1] = "load_module " .. p .. ";" end
  return table.concat(lines, "\n")
end

local function probe_nginx(explicit)
  if nginx_info and (not explicit or explicit == nginx_info.bin) then return nginx_info end
  local bin = find_nginx(explicit)
  local v = run(q(bin) .. " -V")
  local major, minor, patch = v:match("nginx/(%d+)%.(%d+)%.(%d+)")
  local info = {
    bin = bin,
    prefix = v:match("%-%-prefix=(%S+)") or "/usr/share/nginx",
    modules = v:match("%-%-modules%-path=(%S+)") or "/usr/lib/nginx/modules",
    static_lua = v:find("lua-nginx-module", 1, true) ~= nil or v:find("openresty", 1, true) ~= nil,
    -- -e (error log at startup) exists since 1.19.5
    has_e = major and (tonumber(major) * 1000000 + tonumber(minor) * 1000 + tonumber(patch)) >= 1019005,
  }
  info.modules_conf = module_lines(info)
  local uid = run("id -u"):match("%d+")
  info.root = uid == "0"
  nginx_info = info
  return info
end

-- HTTP with the curl CLI ------------------------------------------------------

local cjson = require "cjson.safe"

local function http(method, url, body)
  local cmd = CLEAN .. "curl -sS --max-time 10 -X " .. method
  if body then cmd = cmd .. " -H 'Content-Type: application/json' --data-binary " .. q(body) end
  local p = assert(io.popen(cmd .. " " .. q(url) .. " 2>&1", "r"))
  local out = p:read("a")
  local ok = p:close()
  if not ok then return nil, "curl " .. method .. " " .. url .. ": " .. out end
  return out
end

local function http_json(method, url, body)
  local out, err = http(method, url, body)
  if not out then error("upstream: " .. err, 3) end
  local v, derr = cjson.decode(out)
  if v == nil then error("upstream: " .. method .. " " .. url .. " gave non-JSON (" .. tostring(derr) .. "): " .. out, 3) end
  return v
end

-- Process handling ------------------------------------------------------------

-- Whether pid runs. A zombie counts as gone: a daemonized nginx master is
-- reparented to PID 1, which may take its time to reap it.
local function alive(pid)
  local stat = read_file("/proc/" .. pid .. "/stat")
  if stat then
    local state = stat:match("^%d+ %b() (%a)")
    return state ~= nil and state ~= "Z" and state ~= "X"
  end
  if exists("/proc/self/stat") then return false end
  local _, ok = run("kill -0 " .. pid)
  return ok
end

local function children(pid)
  local list = {}
  local s = read_file("/proc/" .. pid .. "/task/" .. pid .. "/children") or ""
  for c in s:gmatch("%d+") do list[#list + 1] = c end
  return list
end

-- Wait up to about `secs` for pid to exit.
local function wait_gone(pid, secs)
  for _ = 1, math.ceil(secs / 0.02) do
    if not alive(pid) then return true end
    os.execute("sleep 0.02")
  end
  return not alive(pid)
end

-- Whether something listens on the TCP port already (Linux /proc; false
-- when unknown: nginx's bind then decides).
local function port_taken(port)
  local hex = ("%04X"):format(port)
  for _, table_path in ipairs({ "/proc/net/tcp", "/proc/net/tcp6" }) do
    local s = read_file(table_path) or ""
    for lport, state in s:gmatch("\n%s*%d+: %x+:(%x+) %x+:%x+ (%x%x)") do
      if lport == hex and state == "0A" then return true end
    end
  end
  return false
end

local function is_prefix(prefix)
  return type(prefix) == "string" and prefix ~= "" and prefix ~= "/" and exists(prefix .. "/.slm-upstream")
end

-- Stop the nginx that runs from `prefix` and remove the directory. Returns
-- true, or nil and a message.
function M.stop_prefix(prefix)
  if not is_prefix(prefix) then
    return nil, "upstream: " .. tostring(prefix) .. " is not a test upstream prefix directory"
  end
  local pid = (read_file(prefix .. "/nginx.pid") or ""):match("%d+")
  local problem
  -- an nginx killed with SIGKILL leaves its pid file: that pid may now be
  -- another process, which is never signalled (the master's command line
  -- names this prefix's nginx.conf; where /proc cannot tell, trust the file)
  local cmdline = pid and read_file("/proc/" .. pid .. "/cmdline")
  if cmdline and not cmdline:find(prefix, 1, true) then pid = nil end
  if pid and alive(pid) then
    local workers = children(pid)
    run("kill -TERM " .. pid)              -- what `nginx -s stop` sends
    if not wait_gone(pid, 5) then
      for _, w in ipairs(workers) do run("kill -KILL " .. w) end
      run("kill -KILL " .. pid)
      if not wait_gone(pid, 2) then problem = "nginx master " .. pid .. " did not exit" end
    end
    -- workers exit with the master; make sure
    for _, w in ipairs(workers) do
      if alive(w) and not wait_gone(w, 2) then run("kill -KILL " .. w) end
    end
  end
  run("rm -rf " .. q(prefix))
  if problem then return nil, "upstream: " .. problem end
  return true
end

-- The handle ------------------------------------------------------------------

local Upstream = {}
Upstream.__index = Upstream

function Upstream:get(path)
  return http_json("GET", self.base .. path)
end

function Upstream:post(path, body)
  return http_json("POST", self.base .. path, body)
end

-- {requests, in_flight, max_in_flight, aborted, by_key}
function Upstream:stats()
  return self:get("/__sim/stats")
end

-- the Batch API's counters (batches.lua): {uploads, creates, lines, lines_by_custom_id, ...}
function Upstream:batch_stats()
  return self:get("/__sim/batch_stats")
end

function Upstream:reset()
  return self:post("/__sim/reset", "")
end

-- The last chat request: {method, uri, headers, body, raw_body}.
function Upstream:last()
  return self:get("/__sim/last")
end

function Upstream:error_log()
  return read_file(self.prefix .. "/logs/error.log") or ""
end

-- Idempotent. Raises if nginx would not stop.
function Upstream:stop()
  if self.stopped then return true end
  self.stopped = true
  local ok, err = M.stop_prefix(self.prefix)
  if not ok then error(err, 2) end
  return true
end
Upstream.__close = Upstream.stop

function Upstream:__tostring()
  return ("upstream %s (prefix %s)"):format(self.url, self.prefix)
end

-- Start ---------------------------------------------------------------------

local function render(template, vars)
  return (template:gsub("@([%u_]+)@", function(name)
    local v = vars[name]
    if v == nil then error("upstream: template placeholder @" .. name .. "@ has no value", 0) end
    return v
  end))
end

local seeded = false
local function random_port()
  if not seeded then
    -- Lua 5.4 seeds randomly at start; mix in the clock so that processes
    -- started in the same instant still differ
    math.randomseed(os.time(), math.floor(os.clock() * 1e6) + tonumber(tostring({}):match("0x(%x+)") or "0", 16))
    seeded = true
  end
  return math.random(PORT_MIN, PORT_MAX)
end

-- Start a simulator. opts: port (fixed; default random in 20000-45000,
-- retried when taken), quiet (no message on stderr), timeout (seconds to
-- wait for it to answer, default 5), nginx (binary path), workers (nginx
-- worker processes, default 1; with more, GET /__sim/last is refused: each
-- worker only knows its own last request), tls (also serve HTTPS with
-- HTTP/2 on port + 1, with a fresh self-signed certificate, and cleartext
-- HTTP/2 with prior knowledge on port + 2: up.tls_url, up.ca_file,
-- up.h2c_url).
-- owner_pid = n: a process whose end (however it ends) stops the instance,
-- within a second (the examples' own process: SIGTERM or SIGKILL leave no
-- simulator behind).
-- app = { http = "...", server = "..." }: instead of the simulator, an nginx
-- running lua-slm itself (app.conf.in): the checkout's lua/ on its
-- lua_package_path, slm/core.so from SLM_NGX_CPATH (default build-jit/),
-- the given http-level directives and server-level locations; it is ready
-- when GET /__health answers.
function M.start(opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("upstream.start: opts must be a table", 2) end
  if opts.port ~= nil and not math.tointeger(opts.port) then error("upstream.start: port must be an integer", 2) end
  local workers = opts.workers == nil and 1 or math.tointeger(opts.workers)
  if not workers or workers < 1 or workers > 64 then
    error("upstream.start: workers must be an integer in 1..64", 2)
  end
  local tls = opts.tls and true or false
  local where = locate()
  local info = probe_nginx(opts.nginx)
  local app = opts.app
  if app ~= nil and type(app) ~= "table" then error("upstream.start: app must be a table", 2) end
  local tname = app and "/app.conf.in" or "/nginx.conf.in"
  local template = read_file(where.upstream .. tname)
  if not template then error("upstream: cannot read " .. where.upstream .. tname, 0) end
  local ready_path = app and "/__health" or "/__sim/stats"

  local tmp = os.getenv("TMPDIR")
  if not tmp or tmp == "" then tmp = "/tmp" end
  local out, ok = run("mktemp -d " .. q(tmp .. "/slm-upstream.XXXXXX"))
  local prefix = out:match("^([^\n]+)")
  if not ok or not prefix then error("upstream: mktemp failed: " .. out, 0) end
  run("mkdir -p " .. q(prefix .. "/logs") .. " " .. q(prefix .. "/tmp"))
  write_file(prefix .. "/.slm-upstream", "test upstream prefix; removed by stop\n")

  local cert, key = prefix .. "/cert.pem", prefix .. "/key.pem"
  if tls then
    -- an EC key: a few milliseconds, where RSA would take a tenth of a second
    local out_tls, made = run("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
      .. " -keyout " .. q(key) .. " -out " .. q(cert) .. " -days 2 -subj /CN=127.0.0.1"
      .. " -addext subjectAltName=IP:127.0.0.1")
    if not made then
      M.stop_prefix(prefix)
      error("upstream: openssl could not make a certificate: " .. tail(out_tls, 10), 0)
    end
  end
  local function extra_listen(p)
    if not tls then return "" end
    return ("listen 127.0.0.1:%d ssl http2;\n        listen 127.0.0.1:%d http2;\n"
      .. "        ssl_certificate %s;\n        ssl_certificate_key %s;"):format(p + 1, p + 2, cert, key)
  end
  local function ports_taken(p)
    return port_taken(p) or (tls and (port_taken(p + 1) or port_taken(p + 2)))
  end

  if opts.port and ports_taken(opts.port) then
    M.stop_prefix(prefix)
    error(("upstream: nginx did not start: 127.0.0.1:%d is taken (Address already in use)"):format(opts.port), 0)
  end

  local conf = prefix .. "/nginx.conf"
  local log = prefix .. "/logs/error.log"
  local tries = opts.port and 1 or BIND_TRIES
  local port, last_out
  for _ = 1, tries do
    port = opts.port or random_port()
    while not opts.port and ports_taken(port) do port = random_port() end
    local rendered, rerr = pcall(render, template, {
      USER = info.root and "user root root;" or "",
      MODULES = info.modules_conf,
      PREFIX = prefix,
      PORT = tostring(port),
      WORKERS = tostring(workers),
      EXTRA_LISTEN = extra_listen(port),
      UPSTREAM_DIR = where.upstream,
      LUA_ROOT = ("%q"):format(where.root),
      LUA_DIR = where.root .. "/lua",
      TESTS_DIR = where.root .. "/tests",
      CPATH = os.getenv("SLM_NGX_CPATH") or (where.root .. "/build-jit"),
      APP_HTTP = app and (app.http or "") or "",
      APP_SERVER = app and (app.server or "") or "",
    })
    if not rendered then
      M.stop_prefix(prefix)
      error(rerr, 0)
    end
    write_file(conf, rerr)
    local cmd = q(info.bin) .. " -p " .. q(prefix .. "/") .. " -c " .. q(conf)
    if info.has_e then cmd = cmd .. " -e " .. q(log) end
    local started
    last_out, started = run(cmd)
    if started then break end
    port = nil
    local why = last_out .. (read_file(log) or "")
    if not why:find("Address already in use", 1, true) then break end
  end
  if not port then
    local log_tail = tail(read_file(log), 20)
    M.stop_prefix(prefix)
    error("upstream: nginx did not start: " .. tail(last_out, 10) .. "\n--- error log ---\n" .. log_tail, 0)
  end

  local base = "http://127.0.0.1:" .. port
  local timeout = tonumber(opts.timeout) or 5
  local _, ready = run(("for i in $(seq %d); do [ \"$(curl -s -o /dev/null -w '%%{http_code}' --max-time 1 %s)\" = 200 ]"
    .. " && exit 0; sleep 0.05; done; exit 1"):format(math.ceil(timeout / 0.05), q(base .. ready_path)))
  if not ready then
    local log_tail = tail(read_file(log), 20)
    M.stop_prefix(prefix)
    error(("upstream: nginx on port %d did not answer GET %s within %gs\n--- error log ---\n%s")
      :format(port, ready_path, timeout, log_tail), 0)
  end

  local up = setmetatable({
    url = base .. "/v1",
    base = base,
    port = port,
    prefix = prefix,
    pid = tonumber((read_file(prefix .. "/nginx.pid") or ""):match("%d+")),
  }, Upstream)
  if tls then
    up.tls_url = ("https://127.0.0.1:%d/v1"):format(port + 1)
    up.h2c_url = ("http://127.0.0.1:%d/v1"):format(port + 2)
    up.ca_file = cert
  end
  if opts.owner_pid then
    -- a watcher of its own: once the owner is gone (SIGTERM, SIGKILL, a
    -- crash: anything its own clean-up cannot run after), it stops this
    -- instance; a stop before that leaves the watcher nothing to do
    local stop = "lua5.4 " .. q(where.upstream .. "/launch.lua") .. " stop " .. q(prefix)
    run(("(while kill -0 %d 2>/dev/null && [ -d %s ]; do sleep 0.5; done; [ -d %s ] && %s) </dev/null "
      .. ">/dev/null 2>&1 &"):format(opts.owner_pid, q(prefix), q(prefix), stop))
  end
  if not opts.quiet then io.stderr:write("upstream: ", up.url, " (prefix ", prefix, ")\n") end
  return up
end

-- CLI -------------------------------------------------------------------------

local function cli(argv)
  local cmd = argv[1]
  if cmd == "start" then
    local port, workers
    local i = 2
    while argv[i] do
      local a = argv[i]
      if a == "--workers" then
        workers = math.tointeger(tonumber(argv[i + 1]))
        if not workers or workers < 1 then
          io.stderr:write("launch.lua: --workers needs a positive integer, got ", tostring(argv[i + 1]), "\n")
          return 2
        end
        i = i + 2
      elseif not port then
        port = math.tointeger(tonumber(a))
        if not port then
          io.stderr:write("launch.lua: bad port ", a, "\n")
          return 2
        end
        i = i + 1
      else
        io.stderr:write("launch.lua: unexpected argument ", a, "\n")
        return 2
      end
    end
    local ok, up = pcall(M.start, { port = port, workers = workers, quiet = true })
    if not ok then
      io.stderr:write(tostring(up), "\n")
      return 1
    end
    print(up.url)
    print(up.prefix)
    io.stderr:write("stop with: lua5.4 ", locate().upstream, "/launch.lua stop ", up.prefix, "\n")
    return 0
  elseif cmd == "stop" and argv[2] then
    local ok, err = M.stop_prefix(argv[2])
    if not ok then
      io.stderr:write(err, "\n")
      return 1
    end
    return 0
  end
  io.stderr:write("usage: lua5.4 tests/upstream/launch.lua start [port] [--workers N]\n",
    "       lua5.4 tests/upstream/launch.lua stop <prefix>\n")
  return 2
end

-- Run as a script (not required as a module): `...` are the arguments.
if arg and arg[0] and arg[0]:match("launch%.lua$") and select("#", ...) == #arg and (...) == arg[1] then
  os.exit(cli(arg))
end

-- shell quoting, commands, files and processes, for tests/redis_launch.lua
M.util = { q = q, run = run, read_file = read_file, port_taken = port_taken, alive = alive }

return M
