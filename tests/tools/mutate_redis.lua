-- mutate_redis.lua - can every spec of tests/redis_spec.lua fail?
--
--   lua5.4 tests/tools/mutate_redis.lua         # every mutation
--   lua5.4 tests/tools/mutate_redis.lua 2 5     # only these
--
-- Each mutation breaks lua/slm/shared/redis.lua in one way; the runner
-- (tests/tools/mutate.lua) runs the spec against the broken copy and says
-- which specs failed.  A dev tool: bin/test does not run it (about seven
-- seconds a mutation: each run starts redis-server and the simulator).
-- The specs tagged #transport are about slm.transport.tcp, the socket
-- under the plain-Lua client: they get mutations of that module (a second
-- run).  The nginx side (tests/redis_ngx_spec.lua) loads lua/ from the
-- checkout itself, so it is not mutated here; the C side (Multi:watch,
-- tcp.c) was broken by hand (a watched descriptor never reported, or
-- never disarmed: core_tcp_spec and redis_spec fail).
local root = debug.getinfo(1, "S").source:match("^@(.*)/tests/tools/") or "."
package.path = root .. "/?.lua;" .. package.path

local MUTATIONS = {
  { "reserve overshoots", "usd > left_u + 1e-12", "usd > left_u + 1" },
  { "token limit ignored", "(lt >= 0 and tokens > left_t)", "false" },
  { "dead holds never reaped", 'redis.call("ZRANGEBYSCORE", k .. ":holds", "-inf", now_ms)',
    'redis.call("ZRANGEBYSCORE", k .. ":holds", "-inf", 0)' },
  { "holds live for ever", 'redis.call("ZADD", k .. ":holds", now_ms + tonumber(ARGV[5]), id)',
    'redis.call("ZADD", k .. ":holds", now_ms + 1e12, id)' },
  { "settle keeps the hold", 'redis.call("HDEL", k .. ":amts", id)\nredis.call("HINCRBYFLOAT"',
    'redis.call("HINCRBYFLOAT"' },
  { "settle forgets the spend", 'redis.call("HINCRBYFLOAT", k .. ":spent", "usd", ARGV[2])\n', "" },
  { "days not apart", 'if period == "day" then return string.format(":%04d-%02d-%02d", y, m, d) end',
    'if period == "day" then return ":day" end' },
  { "months not apart", 'return string.format(":%04d-%02d", y, m)\nend', 'return ":month"\nend' },
  { "no EVAL on NOSCRIPT", 'find(err.message, "NOSCRIPT", 1, true)', 'find(err.message, "NOSCRIPTX", 1, true)' },
  { "AUTH reply echoes the password", 'setup[i][1] .. " refused: " .. r.err',
    'setup[i][1] .. " refused: " .. r.err .. " " .. tostring(setup[i][2])' },
  { "a refused password is a server error", 'if find(msg, "^WRONGPASS")', 'if find(msg, "^XWRONGPASS")' },
  { "no retry on a dead pooled connection", "      if again then return call_plain(self, args, n, false) end\n", "" },
  { "rate limit never waits", "if level >= n then level = level - n else", "if true then level = level - n else" },
  { "semaphore keeps dead holders", 'redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now)\nif',
    'redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", 0)\nif' },
  { "semaphore n + 1", 'if redis.call("ZCARD", KEYS[1]) >= tonumber(ARGV[1])', 'if redis.call("ZCARD", KEYS[1]) > tonumber(ARGV[1])' },
  { "release frees nothing", 'self.conn:command("ZREM", self.key, token)', 'self.conn:command("PING")' },
  { "sessions keyed by the id", 'self.conn:command("GET", self.prefix .. core.sha256(id))', 'self.conn:command("GET", self.prefix .. id)' },
  { "delete misses", 'self.conn:command("DEL", self.prefix .. core.sha256(id))', 'self.conn:command("DEL", self.prefix .. id)' },
  { "cache ttl ignored", 'value, "PX", ceil(ttl * 1000))', "value)" },
  { "storage failures all of one kind", '  return nil, errors.new(kind, format("redis %s: %s: %s"', '  return nil, errors.new("server", format("redis %s: %s: %s"' },
  { "a nil reply read as a string", '    if n < 0 then return false end\n    local b, k2, m2', '    if n < 0 then return "" end\n    local b, k2, m2' },
  { "cache get always misses", "  if v == false then return nil end\n  return v\nend", "  return nil\nend" },
  { "unknown options taken", 'if not known[k] then error(format("slm.redis.%s: unknown option', 'if false then error(format("slm.redis.%s: unknown option' },
}

local TRANSPORT = {
  { "a wait that blocks the loop", "  if sched.await_fd(self.fd, want, deadline(self)) then return true end",
    "  local d = deadline(self); while now() < d do end\n  if true then return true end" },
  { "bytes after a line dropped", "      self.buf = sub(self.buf, e + 2)", '      self.buf = ""' },
  { "no timeouts", "  return self.timeout and now() + self.timeout or nil", "  return nil" },
  { "a timeout taken for readiness", '  return nil, "timeout", what .. " timed out after "', '  do return true end\n  return nil, "timeout", what .. " timed out after "' },
}

local mutate = require "tests.tools.mutate"
local picked = arg[1] ~= nil
local a = mutate.run({
  module = "slm/shared/redis.lua", spec = "--exclude-tags=transport tests/redis_spec.lua", mutations = MUTATIONS,
  scratch = "slm-mutate-redis", strip = "slm%.redis ", timeout = 180,
}, arg)
local b = picked and 0 or mutate.run({
  module = "slm/transport/tcp.lua", spec = "--tags=transport tests/redis_spec.lua", mutations = TRANSPORT,
  scratch = "slm-mutate-redis-tcp", strip = "slm%.redis ", timeout = 180,
}, arg)
os.exit(math.max(a, b))
