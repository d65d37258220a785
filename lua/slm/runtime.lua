-- slm.runtime: which runtime (slm.transport.*) moves the bytes here.
--
--   runtime.default() -> the libcurl runtime in plain Lua and batch jobs;
--                        inside nginx (ngx.get_phase exists) the cosocket
--                        runtime, in every phase
--   runtime.get("curl" | "ngx" | rt) -> a runtime
--
-- Under OpenResty libcurl would block the nginx worker, so it is never
-- chosen there unless asked for by name (the client's transport = "curl").
-- The cosocket runtime is the default in every phase, init_by_lua and
-- init_worker_by_lua included (a client is usually made once per worker
-- there); its calls raise a clear error, naming the phase, where nginx
-- allows no cosockets (init, init_worker outside a timer, set, filters,
-- log, balancer).
local type, error, pcall, require = type, error, pcall, require

local M = {}

local cache = {}

local function load(name)
  local rt = cache[name]
  if rt then return rt end
  local ok, r = pcall(require, "slm.transport." .. name)
  if not ok then error(r, 0) end
  cache[name] = r
  return r
end

--- Whether this code runs inside nginx (lua-nginx-module or OpenResty).
function M.in_nginx()
  return ngx ~= nil and type(ngx.get_phase) == "function" and ngx.socket ~= nil
end

--- The runtime for this process.
function M.default()
  if M.in_nginx() then return load("ngx") end
  return load("curl")
end

--- A runtime by name, or the runtime table itself.
function M.get(x)
  if x == nil then return M.default() end
  if type(x) == "table" then return x end
  return load(x)
end

return M
