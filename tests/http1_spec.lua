-- slm.transport.http1: the cosocket runtime's HTTP/1.1 reply parser, fed
-- hostile and split input.  Pure Lua: bin/test runs it under Lua 5.4 and
-- LuaJIT.
local http1 = require "slm.transport.http1"

-- Feed `bytes` in pieces of `step` bytes (every split point with step 1);
-- -> parser, body, ok, kind, msg (the first failure)
local function parse(bytes, step, opts)
  local p = http1.parser(opts)
  local body = {}
  step = step or #bytes
  for i = 1, #bytes, step do
    local ok, kind, msg = p:feed(bytes:sub(i, i + step - 1))
    body[#body + 1] = p:take()
    if not ok then return p, table.concat(body), ok, kind, msg end
  end
  return p, table.concat(body), true
end

local function each_split(bytes, fn, opts)
  for _, step in ipairs{ #bytes, 1, 2, 3, 5, 7, 13 } do fn(step, parse(bytes, step, opts)) end
end

local CHUNKED = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
  .. "5\r\nhello\r\n" .. "1a;ext=1\r\n" .. ("x"):rep(26) .. "\r\n" .. "0\r\nX-Trailer: t\r\n\r\n"

describe("http1.request", function()
  it("writes the request line, Host, our headers and Content-Length; drops the caller's framing", function()
    local s = http1.request{ method = "POST", target = "/v1/chat/completions", host = "127.0.0.1:8080",
      headers = { "Content-Type: application/json", "Content-Length: 99", "Host: evil", "Connection: close" },
      body = "{}" }
    assert.equal("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
      .. "Content-Type: application/json\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n{}", s)
  end)
  it("parses URLs", function()
    local u = http1.parse_url("https://user:pw@api.example.com/v1/chat/completions?x=1#frag")
    assert.same({ scheme = "https", host = "api.example.com", port = 443, target = "/v1/chat/completions?x=1",
      userinfo = "user:pw", authority = "api.example.com" }, u)
    assert.equal(8080, http1.parse_url("http://127.0.0.1:8080").port)
    assert.equal("/", http1.parse_url("http://127.0.0.1:8080").target)
    assert.equal("::1", http1.parse_url("http://[::1]:9/x").host)
    assert.is_nil(http1.parse_url("ftp://x/"))
    assert.is_nil(http1.parse_url("http://:80/"))
    assert.is_nil(http1.parse_url("http://h:99999/"))
  end)
end)

describe("http1.parser", function()
  it("parses a Content-Length reply split anywhere", function()
    local reply = "HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Request-Id: req-1\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello world"
    each_split(reply, function(step, p, body, ok)
      assert.is_true(ok, step)
      assert.equal(200, p.status)
      assert.equal("req-1", p.headers["x-request-id"])
      assert.equal("2", p.headers["x-a"]) -- the last, as libcurl's headers()
      assert.equal("hello world", body)
      assert.is_true(p.done)
      assert.is_true(p.reusable)
    end)
  end)

  it("decodes a chunked body split anywhere, chunk sizes and CRLFs included, trailers skipped", function()
    each_split(CHUNKED, function(step, p, body, ok)
      assert.is_true(ok, step)
      assert.equal("hello" .. ("x"):rep(26), body)
      assert.is_true(p.done, step)
      assert.is_true(p.reusable)
      assert.is_nil(p.headers["x-trailer"])
    end)
  end)

  it("hands out body bytes as they arrive, before the end", function()
    local p = http1.parser()
    assert.is_true(p:feed("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"))
    assert.is_true(p.head_done)
    assert.equal("hel", p:take())
    assert.is_nil(p:take())
    assert.is_true(p:feed("lo\r\n"))
    assert.equal("lo", p:take())
    assert.is_false(p.done)
  end)

  it("refuses bad chunk sizes", function()
    for _, size in ipairs{ "zz", "-1", "0x10", "", " 5", "5 junk", ("f"):rep(13), "1" .. ("0"):rep(20) } do
      local _, _, ok, kind, msg = parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" .. size .. "\r\nabcde\r\n0\r\n\r\n")
      assert.is_nil(ok, size)
      assert.equal("protocol", kind, size)
      assert.matches("chunk", msg)
    end
    -- leading zeros are fine; so are extensions
    local _, body, ok = parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0005;a=b\r\nabcde\r\n0\r\n\r\n", 1)
    assert.is_true(ok)
    assert.equal("abcde", body)
    -- chunk data must end with CRLF
    local _, _, ok2, kind2 = parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcde\r\n0\r\n\r\n")
    assert.is_nil(ok2)
    assert.equal("protocol", kind2)
    -- an endless chunk-size line
    local _, _, ok3, kind3 = parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" .. ("0"):rep(5000))
    assert.is_nil(ok3)
    assert.equal("protocol", kind3)
  end)

  it("refuses a Content-Length that is malformed, doubled or above max_body, before reading the body", function()
    for _, cl in ipairs{ "abc", "-5", "1e3", "99999999999999999999", "5, 6" } do
      local _, _, ok, kind = parse("HTTP/1.1 200 OK\r\nContent-Length: " .. cl .. "\r\n\r\nhello")
      assert.is_nil(ok, cl)
      assert.equal("protocol", kind, cl)
    end
    local _, _, ok, kind = parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello")
    assert.is_nil(ok)
    assert.equal("protocol", kind)
    local p, _, ok2, kind2, msg2 = parse("HTTP/1.1 200 OK\r\nContent-Length: 999999999999\r\n\r\nhello", nil,
      { max_body = 1000 })
    assert.is_nil(ok2)
    assert.equal("protocol", kind2)
    assert.matches("max_body", msg2)
    assert.equal(0, p.received)
    -- two equal ones are one
    local _, body = parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello")
    assert.equal("hello", body)
  end)

  it("stops at max_body in chunked and read-until-close bodies too", function()
    local _, _, ok, kind = parse(CHUNKED, 1, { max_body = 20 })
    assert.is_nil(ok)
    assert.equal("protocol", kind)
    local p = http1.parser{ max_body = 10 }
    assert.is_true(p:feed("HTTP/1.0 200 OK\r\n\r\n12345"))
    local ok2, kind2 = p:feed("678901")
    assert.is_nil(ok2)
    assert.equal("protocol", kind2)
    assert.equal("protocol", select(2, p:feed("more")))
  end)

  it("joins folded header lines", function()
    each_split("HTTP/1.1 200 OK\r\nX-Long: one\r\n two\r\n\tthree\r\nContent-Length: 0\r\n\r\n",
      function(step, p, _, ok)
        assert.is_true(ok, step)
        assert.equal("one two three", p.headers["x-long"])
        assert.is_true(p.done)
      end)
    local _, _, ok, kind = parse("HTTP/1.1 200 OK\r\n folded first\r\n\r\n")
    assert.is_nil(ok)
    assert.equal("protocol", kind)
  end)

  it("refuses malformed status lines and header lines, and endless headers", function()
    for _, head in ipairs{ "HTTP/1.1 20 OK", "HTTP/1.1 2000 OK", "ICY 200 OK", "HTTP/1.1 200OK", "", "garbage" } do
      local _, _, ok, kind = parse(head .. "\r\nContent-Length: 0\r\n\r\n")
      assert.is_nil(ok, head)
      assert.equal("protocol", kind, head)
    end
    local _, _, ok, kind = parse("HTTP/1.1 200 OK\r\nno colon here\r\n\r\n")
    assert.is_nil(ok)
    assert.equal("protocol", kind)
    local p = http1.parser()
    local ok2, kind2
    for _ = 1, 2000 do
      ok2, kind2 = p:feed("X-Filler: " .. ("a"):rep(60) .. "\r\n")
      if not ok2 then break end
    end
    assert.is_nil(ok2)
    assert.equal("protocol", kind2)
    -- a bare status line with no reason is fine, LF-only lines too
    local p3, body3, ok3 = parse("HTTP/1.1 204\nX-A: b\n\n")
    assert.is_true(ok3)
    assert.equal(204, p3.status)
    assert.equal("", body3)
    assert.is_true(p3.done)
  end)

  it("reports a close mid-body, mid-chunk, inside the headers and before any reply as kind connect", function()
    local cases = {
      { "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", "mid%-reply" },
      { CHUNKED:sub(1, 100), "mid%-reply" },
      { "HTTP/1.1 200 OK\r\nContent-Ty", "inside the reply's headers" },
      { "", "before a reply" },
    }
    for _, c in ipairs(cases) do
      local p = parse(c[1], 3)
      local ok, kind, msg = p:eof()
      assert.is_nil(ok, c[1])
      assert.equal("connect", kind)
      assert.matches(c[2], msg)
      assert.is_false(p.reusable)
    end
  end)

  it("reads a body without length to the close, and never reuses that connection", function()
    local p, body, ok = parse("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it", 4)
    assert.is_true(ok)
    assert.is_false(p.done)
    assert.is_true(p:eof())
    assert.is_true(p.done)
    assert.equal("all of it", body .. (p:take() or ""))
    assert.is_false(p.reusable)
  end)

  it("does not reuse after Connection: close, HTTP/1.0, surplus bytes or chunked with a length", function()
    local function reusable(s) local p = parse(s) return p.done and p.reusable end
    assert.is_false(reusable("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi"))
    assert.is_false(reusable("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi"))
    assert.is_true(reusable("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi"))
    assert.is_false(reusable("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiEXTRA"))
    assert.is_false(reusable("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"))
    local _, body = parse("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiEXTRA")
    assert.equal("hi", body) -- the surplus is not body
  end)

  it("skips interim 1xx replies; HEAD, 204 and 304 have no body", function()
    local p, body, ok = parse("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 1)
    assert.is_true(ok)
    assert.equal(200, p.status)
    assert.equal("ok", body)
    local p2 = parse("HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n", nil, { method = "HEAD" })
    assert.is_true(p2.done)
    local p3 = parse("HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n")
    assert.is_true(p3.done)
  end)

  -- A chunked reply of many small chunks (sizes 1 to 9, some with
  -- extensions, some with bare LF line ends) and the body it carries.
  local function many_chunks(n)
    local parts, body = { "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" }, {}
    for i = 1, n do
      local size = i % 9 + 1
      local data = string.char(97 + i % 26):rep(size - 1) .. (i % 5 == 0 and "\n" or "\r")
      local eol = i % 7 == 0 and "\n" or "\r\n"
      parts[#parts + 1] = ("%x%s%s"):format(size, i % 11 == 0 and ";x=" .. i or "", eol) .. data .. eol
      body[#body + 1] = data
    end
    parts[#parts + 1] = "0\r\n\r\n"
    return table.concat(parts), table.concat(body)
  end

  it("decodes a body of many small chunks, split anywhere", function()
    local reply, want = many_chunks(3000)
    for _, step in ipairs{ #reply, 1, 2, 3, 4, 7, 16, 61, 500, 4096, 65536 } do
      local p, body, ok, kind, msg = parse(reply, step)
      assert.is_true(ok, step .. ": " .. tostring(kind) .. " " .. tostring(msg))
      assert.equal(#want, #body, step)
      assert.equal(want, body, step)
      assert.is_true(p.done, step)
      assert.is_true(p.reusable, step)
      assert.equal("", p.buf, step)
    end
    -- the same with a byte after the end: not reusable
    local p, body, ok = parse(reply .. "X", 1000)
    assert.is_true(ok)
    assert.equal(want, body)
    assert.is_false(p.reusable)
  end)

  it("copies the rest of its buffer once per read, not once per chunk", function()
    -- the bytes string.sub hands out while one read of 20000 chunks is
    -- parsed: about the size of the reply, not the square of it
    local reply, want = many_chunks(20000)
    local real, copied = string.sub, 0
    string.sub = function(s, i, j)
      local r = real(s, i, j)
      copied = copied + #r
      return r
    end
    local ok, err = pcall(function()
      package.loaded["slm.transport.http1"] = nil
      local h = require "slm.transport.http1" -- its local sub is the counting one
      local p = h.parser()
      copied = 0
      assert.is_true(p:feed(reply))
      assert.equal(want, p:take())
      assert.is_true(p.done)
    end)
    string.sub = real
    package.loaded["slm.transport.http1"] = nil
    http1 = require "slm.transport.http1"
    assert(ok, err)
    assert.is_true(copied < 4 * #reply, ("%d bytes copied for a reply of %d"):format(copied, #reply))
  end)

  it("keeps failing once it failed", function()
    local p = http1.parser()
    assert.is_nil(p:feed("NOPE\r\n\r\n"))
    local ok, kind = p:feed("HTTP/1.1 200 OK\r\n\r\n")
    assert.is_nil(ok)
    assert.equal("protocol", kind)
    assert.equal("protocol", select(2, p:eof()))
  end)
end)
