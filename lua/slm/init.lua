-- lua-slm: small language models at work in Lua.
--
--   local slm = require "slm"
--   local client = slm.client{ model = "gpt-4o-mini" }
--   local res, err = client:chat{ messages = {{ role = "user", content = "Hi" }} }
--
-- Everything public is reachable from this table; see README.md.
local client = require "slm.client"
local sched = require "slm.sched"
local models = require "slm.models"
local errors = require "slm.errors"
local budget = require "slm.budget"

local slm = {
  VERSION = client.VERSION,
  core = require "slm.core",
}

slm.client = client.new
slm.run = sched.run
slm.spawn = sched.spawn
slm.map = sched.map
slm.sleep = sched.sleep
slm.models = models.table
slm.cost = models.cost
slm.budget = budget.new
slm.error = errors.new
slm.is_error = errors.is
slm.errors = errors

-- Modules that may be absent in a partial install load lazily.
local lazy = {
  tokenizer = function() return require("slm.tokenizer").get end,
  count = function() return require("slm.count").count end,
  fit = function() return require("slm.count").fit end,
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
