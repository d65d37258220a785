-- mutate_shared.lua - can the shared-limit specs fail?  Each mutation
-- breaks slm.shdict, the cache, quotas or the client's use of them in one
-- way (literal replacements, each of a text found exactly once) and runs
-- the spec that must catch it (tests/ngx_shared_spec.lua or
-- tests/shared_client_spec.lua, filtered to the specs named).
--
--   lua5.4 tests/tools/mutate_shared.lua         # every mutation
--   lua5.4 tests/tools/mutate_shared.lua 3 12    # only these
--
-- The nginx of ngx_shared_spec loads lua/ from the checkout itself, so a
-- mutation is written over the module in place and the original put back
-- after the run (also when the run fails or is interrupted by an error):
-- run it on a clean checkout with nothing else using it (not beside
-- bin/test).  Exits 1 when a mutation broke nothing or no longer applies.
-- A dev tool: bin/test does not run it (about a minute in all).
local root = debug.getinfo(1, "S").source:match("^@(.*)/tests/tools/") or "."
package.path = root .. "/?.lua;" .. package.path
local H = require "tests.helpers"
local q, sh = H.q, H.sh

local S, NG, CL = "lua/slm/shared/shdict.lua", "tests/ngx_shared_spec.lua", "tests/shared_client_spec.lua"
local P, C, G, Q = "lua/slm/pipeline.lua", "lua/slm/cache.lua", "lua/slm/guard.lua", "lua/slm/quotas.lua"

local MUTATIONS = {
  { "a take never refuses", S, "if t[3] and v ~= true and v > t[3] + EPS then", "if false then", NG, "exactly k" },
  { "a take refuses at the limit", S, "if t[3] and v ~= true and v > t[3] + EPS then",
    "if t[3] and v ~= true and v >= t[3] then", NG, "exactly k" },
  { "amounts of 0 compared", S, "if t[3] and v ~= true and v > t[3] + EPS then", "if t[3] and v > t[3] + EPS then",
    NG, "zero %(" },
  { "the sweep never returns an expired hold", S, "if d:incr(ckey, 1) == 1 then -- ours",
    "if false and d:incr(ckey, 1) == 1 then -- ours", NG, "killed" },
  { "the sweep ignores deadlines", S, "if tonumber(parts[2]) > now then", "if false then", NG, "exactly k" },
  { "no periods", S, "if self.period then suffix, cttl = PERIOD[self.period](self.now()) end", "", NG, "period" },
  { "a period's queue never expires", S, "d:expire(self.q, self.cttl)", "local _ = 0", NG, "period" },
  { "a period's claim keys never expire", S, 'd:safe_add(self.p .. "c:" .. id, 0, self.cttl)',
    'd:safe_add(self.p .. "c:" .. id, 0)', NG, "period" },
  { "the rate limit's window too short", S, 'l = ledger(d, "slm:r:" .. opts.name .. ":", per, clock(opts)),',
    'l = ledger(d, "slm:r:" .. opts.name .. ":", per / 10, clock(opts)),', NG, "rpm limit" },
  { "a released slot stays taken", S, 'if self.l:claim(token.id) then self.l:add("taken", -1) end',
    "self.l:claim(token.id)", NG, "concurrency cap" },
  { "settle keeps the worst case (usd)", S, 'local ok, err = l:add("u", held and usd - r.usd or usd)',
    'local ok, err = l:add("u", usd)', NG, "USD budget" },
  { "settle keeps the worst case (tokens)", S, 'if ok then ok, err = l:add("t", held and tokens - r.tokens or tokens) end',
    'if ok then ok, err = l:add("t", tokens) end', NG, "exactly k" },
  { "a full dict does not fail the budget closed", S, "if id == nil then -- the budget fails closed",
    "if id == nil then return { id = 0, l = l, usd = usd, tokens = tokens } end if false then", NG, "full" },
  { "sessions named by their id", S, "function Store:key(id) return self.prefix .. sha256(id) end",
    "function Store:key(id) return self.prefix .. id end", NG, "support" },
  { "the session store evicts", S, "local ok, err = self.d:safe_set(self:key(id), text, self.ttl)",
    "local ok, err = self.d:set(self:key(id), text, self.ttl)", NG, "round%-trips" },
  { "slm.budget drops a storage error", "lua/slm/budget.lua", 'if not id and type(left_usd) == "table" then',
    "if false then", CL, "storage fails" },
  { "every request deterministic", C, "return body.temperature == 0 or", "return true or body.temperature == 0 or",
    CL, "non%-deterministic" },
  { "replies cut by max_tokens cached", C, 'if fr ~= "stop" and fr ~= "tool_calls" then return false end', "",
    CL, "non%-deterministic" },
  { "the key ignores the body", C, "local ok, s = pcall(json.encode, { v = FORMAT, url = base_url, body = canon })",
    "local ok, s = pcall(json.encode, { v = FORMAT, url = base_url, model = model })", CL, "keys on" },
  { "nothing cached", P, "if self.cache_key then cache.put(self.client, self.cache_key, res) end", "", NG, "cache" },
  { "a hit charges the budget", P, "  local res = cache.get(self.client, key)\n  if not res then return nil end",
    "  local res = cache.get(self.client, key)\n  if not res then return nil end\n"
    .. "  if self.client.budget then self.client.budget:reserve(0, 1) end", CL, "touching the budget" },
  { "a hit without its consumer", P, "if not key or self.no_consumer then return nil end",
    "if not key then return nil end", CL, "without its consumer" },
  { "slots not given back", P, "for i = 1, #t, 2 do t[i]:release(t[i + 1]) end", "", CL, "every exit path" },
  { "a failing limiter ignored", P, "if ok == false or (ok == nil and err ~= nil) then", "if false then",
    CL, "limiter that fails" },
  { "a slot's failure ignored", P,
    'return limit_error(self, err, rt.now() - t0 >= self.timeout and "timeout" or "storage", "concurrency slot")',
    "return true", CL, "no slot" },
  { "no consumer passes", P, "if self.no_consumer then", "if false then", CL, "without a consumer" },
  { "the consumer's slots ignored", P, "if ok and q and q.sem then ok, err = slot(self, q.sem) end", "",
    NG, "own slots" },
  { "quotas named by the raw key", Q, 'local name = self.name .. ":" .. h:sub(1, 24)',
    'local name = self.name .. ":" .. key', NG, "quotas" },
  { "the consumer's budget ignored", G, "local qbudget = h.quota and h.quota.budget", "local qbudget = nil",
    NG, "quotas" },
  { "a consumer's refusal keeps the client's hold", G, "if resv then budget:settle(resv, 0, 0) end -- nothing was sent",
    "", CL, "holds nothing" },
}

local wanted = {}
for _, a in ipairs(arg) do wanted[tonumber(a)] = true end

local env = ("LUA_PATH=%s LUA_CPATH=%s"):format(q(root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. root
  .. "/?.lua;;"), q(root .. "/build/?.so;;"))
local status = 0
for i, m in ipairs(MUTATIONS) do
  if next(wanted) == nil or wanted[i] then
    local path = root .. "/" .. m[2]
    local source = H.read_file(path)
    local a = source:find(m[3], 1, true)
    local line
    if not a or source:find(m[3], a + 1, true) then
      line, status = "DOES NOT APPLY (exactly once)", 1
    else
      H.write_file(path, source:sub(1, a - 1) .. m[4] .. source:sub(a + #m[3]))
      local ok, res, out = pcall(sh, "cd " .. q(root) .. " && " .. env .. " timeout 200 lua5.4 /usr/bin/busted -o TAP"
        .. " --filter=" .. q(m[6]) .. " " .. m[5])
      H.write_file(path, source)
      if not ok then error(res, 0) end
      local failing = select(2, ("\n" .. (out or "")):gsub("\nnot ok ", ""))
      if res or failing == 0 then
        line, status = "BROKE NO SPEC", 1
      else
        line = ("caught (%d failing in %s)"):format(failing, m[5])
      end
    end
    print(("%3d %-46s %s"):format(i, m[1], line))
    io.stdout:flush()
  end
end
os.exit(status)
