-- lua-slm: small language models at work in Lua.
--
--   local slm = require "slm"
--   local client = slm.client{ model = "gpt-4o-mini" }
--   local res, err = client:chat{ messages = {{ role = "user", content = "Hi" }} }
--
-- Everything public is reachable from this table; see README.md.
local client = require "slm.client"
local models = require "slm.models"
local errors = require "slm.errors"
local budget = require "slm.budget"
local runtime = require "slm.runtime"
local json = require "slm.json"

local slm = {
  VERSION = client.VERSION,
  core = require "slm.core",
}

slm.client = client.new
slm.models = models.table
slm.cost = models.cost
slm.budget = budget.new
slm.error = errors.new
slm.is_error = errors.is
slm.errors = errors
slm.json = json
slm.array = json.array

-- Concurrency goes through the runtime of this process (libcurl's
-- scheduler in plain Lua, cosockets and nginx threads under OpenResty).
function slm.run(fn, ...) return runtime.default().run(fn, ...) end
function slm.spawn(fn, ...) return runtime.default().spawn(fn, ...) end
function slm.sleep(s)
  if type(s) ~= "number" then error("slm.sleep: expected seconds, got " .. type(s), 2) end
  return runtime.default().sleep(s)
end
slm.map = require("slm.map").map
slm.runtime = runtime

-- For an outer event loop (luv, cqueues, ...): the libcurl runtime's hooks.
-- The loop watches fd() for readability, wakes after timeout() seconds
-- (nil: only the descriptor can bring work), and calls step(), which runs
-- what is due without blocking and returns the number of live tasks.
slm.loop = {
  fd = function() return runtime.get("curl").fd() end,
  timeout = function() return runtime.get("curl").timeout() end,
  step = function() return runtime.get("curl").step() end,
}

-- Modules that may be absent in a partial install, or that load much
-- (tokenizers), load lazily: the tasks too.
local lazy = {
  tokenizer = function() return require("slm.tokenizer").get end,
  count = function() return require("slm.count").count end,
  fit = function() return require("slm.count").fit end,
  classify = function() return require("slm.tasks.classify") end,
  extract = function() return require("slm.tasks.extract") end,
  summarize = function() return require("slm.tasks.summarize") end,
  generate = function() return require("slm.tasks.generate") end,
  support = function() return require("slm.tasks.support") end,
  route = function() return require("slm.route").route end,
  shdict = function() return require("slm.shared.shdict") end,
  quotas = function() return require("slm.quotas").new end,
  evaluate = function() return require("slm.evaluate") end,
  schema = function() return require("slm.schema") end,
  store = function() return require("slm.store") end,
  pii = function() return require("slm.pii") end,
  bm25 = function() return require("slm.bm25") end,
  redis = function() return require("slm.shared.redis") end,
  ngx = function() return require("slm.ngx") end,
  batchapi = function() return require("slm.batchapi") end,
  csv = function() return require("slm.csv") end,
  jsonl = function() return require("slm.jsonl") end,
}

return setmetatable(slm, {
  __index = function(t, k)
    local f = lazy[k]
    if f then
      local v = f()
      rawset(t, k, v)
      return v
    end
  end,
})
