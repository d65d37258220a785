-- The test runner (bin/test) runs the suite against several builds of
-- slm.core (plain, poll() events, ASan+UBSan); this checks that the build it
-- asked for is the one that loads, so a stage cannot silently test another
-- build.
describe("test environment", function()
  it("loads slm.core from the build the runner asked for", function()
    local want = os.getenv("SLM_EXPECT_CORE")
    if not want then
      pending("SLM_EXPECT_CORE is not set (set by bin/test)")
      return
    end
    local core = require "slm.core"
    assert.is_table(core)
    local got = package.searchpath("slm.core", package.cpath)
    local function real(p)
      local h = io.popen("realpath '" .. p:gsub("'", "'\\''") .. "'")
      local r = h:read("l")
      h:close()
      return r
    end
    assert.are.equal(real(want), real(got))
  end)
end)
