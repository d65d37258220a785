-- slm.runtime: which runtime (slm.transport.*) moves the bytes here.
--
--   runtime.default() -> the libcurl runtime in plain Lua and batch jobs;
--                        inside an OpenResty request the cosocket runtime
--   runtime.get("curl" | "ngx" | rt) -> a runtime
--
-- Under OpenResty libcurl would block the nginx worker, so it is never
-- chosen there: where cosockets are allowed the ngx runtime is, elsewhere
-- (init_by_lua, filters) a clear error.
local type, error, pcall, require = type, error, pcall, require

local M = {}

local cache = {}

local function load(name)
  local rt = cache[name]
  if rt then return rt end
  local ok, r = pcall(require, "slm.transport." .. name)
  if not ok then
    if name == "ngx" then
      error("slm: inside OpenResty lua-slm needs its cosocket transport "
        .. "(slm.transport.ngx), which this version does not have yet", 0)
    end
    error(r, 0)
  end
  cache[name] = r
  return r
end

local function in_nginx()
  return ngx ~= nil and type(ngx.get_phase) == "function" and ngx.socket ~= nil
end

--- The runtime for this process and phase.
function M.default()
  if in_nginx() and ngx.get_phase() ~= "init" then return load("ngx") end
  return load("curl")
end

--- A runtime by name, or the runtime table itself.
function M.get(x)
  if x == nil then return M.default() end
  if type(x) == "table" then return x end
  return load(x)
end

return M
