-- DESIGN.md's layers, checked in the source: nothing above
-- lua/slm/transport/ reaches the libcurl scheduler or libcurl itself; the
-- runtime seam (slm.runtime) is the one place that names a transport.
local function lua_files(dir, out)
  out = out or {}
  local p = assert(io.popen("find " .. dir .. " -name '*.lua' | sort"))
  for f in p:lines() do out[#out + 1] = f end
  p:close()
  return out
end

local function read(f)
  local h = assert(io.open(f, "rb"))
  local s = h:read("a")
  h:close()
  return s
end

describe("the layers", function()
  local above = {}
  for _, f in ipairs(lua_files("lua/slm")) do
    if not f:find("^lua/slm/transport/") then above[#above + 1] = f end
  end

  it("has modules above the transports to check", function()
    assert.is_true(#above >= 15)
  end)

  for _, f in ipairs(above) do
    it(f .. " does not require the scheduler, libcurl's multi or a transport", function()
      local src = read(f)
      assert.is_nil(src:find("slm%.transport%.sched"), "requires the scheduler")
      assert.is_nil(src:find("[\"']slm%.sched[\"']"), "requires the scheduler")
      assert.is_nil(src:find("core%.multi%s*%("), "makes a libcurl multi")
      if f ~= "lua/slm/runtime.lua" then
        assert.is_nil(src:find("slm%.transport%.[%w_]+"), "names a transport (only slm.runtime does)")
      end
    end)
  end
end)
