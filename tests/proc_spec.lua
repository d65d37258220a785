-- core.fsync, core.trap_signals, core.trapped, core.file_id (csrc/proc.c):
-- what the batch runner's ledger, its SIGINT/SIGTERM handling and its
-- output-is-an-input check stand on.
local core = require "slm.core"

-- Runs a Lua 5.4 chunk in a process of its own; -> its stdout, exit status.
local function lua(code)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write('package.cpath = "', package.cpath:gsub("\\", "\\\\"):gsub('"', '\\"'), '"\n', code)
  f:close()
  local p = io.popen("lua5.4 " .. path .. " 2>/dev/null")
  local out = p:read("a")
  local _, how, n = p:close()
  os.remove(path)
  return out, how == "signal" and 128 + n or n
end

describe("core.fsync", function()
  it("flushes and syncs an open file, refuses a closed one or no file", function()
    local path = os.tmpname()
    local f = assert(io.open(path, "wb"))
    f:write("ledger line\n")
    assert.is_true(core.fsync(f))
    local r = assert(io.open(path, "rb"))
    assert.are.equal("ledger line\n", r:read("a")) -- on disk before close: the buffer went out
    r:close()
    f:close()
    assert.has_error(function() core.fsync(f) end)
    assert.has_error(function() core.fsync(42) end)
    os.remove(path)
  end)
end)

describe("core.file_id", function()
  it("is one string for every path of one file (./, a symlink, a hard link), another for another file", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir " .. dir))
    local a, b = dir .. "/a.csv", dir .. "/b.csv"
    for _, p in ipairs{ a, b } do local f = assert(io.open(p, "w")); f:write("x\n"); f:close() end
    assert(os.execute(("ln -s a.csv %s/link.csv && ln %s %s/hard.csv"):format(dir, a, dir)))
    local id = core.file_id(a)
    assert.matches("^%d+:%d+$", id)
    assert.are.equal(id, core.file_id(dir .. "/./a.csv"))
    assert.are.equal(id, core.file_id(dir .. "/link.csv"))
    assert.are.equal(id, core.file_id(dir .. "/hard.csv"))
    assert.are_not.equal(id, core.file_id(b))
    local none, why = core.file_id(dir .. "/missing.csv")
    assert.is_nil(none)
    assert.matches("No such file", why)
    assert.has_error(function() core.file_id(a .. "\0x") end)
    os.execute("rm -r " .. dir)
  end)
end)

describe("core.trap_signals", function()
  it("records SIGINT and SIGTERM instead of dying; a second signal ends the process", function()
    -- the signal comes from a process in the background: system() itself
    -- ignores SIGINT while it waits (POSIX), so `kill` must not be its child
    local pid = [[local pid = io.open("/proc/self/stat"):read("l"):match("^%d+")
      local core = require "slm.core"
      local function signal(sig)
        os.execute("(sleep 0.05; kill -" .. sig .. " " .. pid .. ") &")
        local t = core.now()
        while not core.trapped() and core.now() - t < 30 do end
      end]]
    local out, code = lua(pid .. [[
      assert(core.trapped() == nil)
      core.trap_signals()
      signal("INT")
      io.write(tostring(core.trapped()), "\n")]])
    assert.are.equal("INT\n", out)
    assert.are.equal(0, code)
    out, code = lua(pid .. [[
      core.trap_signals()
      signal("TERM")
      io.write(tostring(core.trapped()), "\n")
      io.flush()
      os.execute("(sleep 0.05; kill -TERM " .. pid .. ") &")
      local t = core.now()
      while core.now() - t < 30 do end
      io.write("still here\n")]])
    assert.are.equal("TERM\n", out)
    assert.are.equal(128 + 15, code)
    -- without the trap SIGTERM is fatal as usual (lua5.4 turns SIGINT into an error of its own)
    out, code = lua(pid .. [[
      os.execute("(sleep 0.05; kill -TERM " .. pid .. ") &")
      local t = core.now()
      while core.now() - t < 30 do end
      io.write("survived\n")]])
    assert.are.equal("", out, out)
    assert.are.equal(128 + 15, code)
  end)
end)
