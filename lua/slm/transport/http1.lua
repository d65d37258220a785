-- slm.transport.http1: HTTP/1.1 for the cosocket runtime, with no I/O: the
-- request's bytes, and an incremental reply parser that takes the bytes
-- as a socket delivers them (any boundaries: a status line, a header, a
-- chunk size split anywhere) and hands out the body decoded.  Pure Lua,
-- the same under Lua 5.4 and LuaJIT (tests/http1_spec.lua runs on both).
--
--   local bytes = http1.request{ method, target, host, headers = {"K: v"}, body }
--   local p = http1.parser{ method = "POST", max_body = n }
--   local ok, kind, msg = p:feed(bytes)  -- kind "protocol" (malformed, too big)
--   p.status, p.headers                  -- once p.head_done (names lowercase,
--                                        -- a repeated one: the last, as libcurl's)
--   p:take() -> body bytes decoded since the last take, or nil
--   p.nbytes                             -- how many bytes the next take holds
--   p.done                               -- the body is complete
--   local ok, kind, msg = p:eof()        -- the peer closed: the end of a
--                                        -- read-until-close body, else "connect"
--   p.reusable                           -- done, and the connection may be kept
--
-- A malformed or oversized reply is kind "protocol", as libcurl's "larger
-- than max_body"; a reply cut by the peer closing is "connect", as a
-- connection libcurl sees break mid-reply.
local tonumber, setmetatable, concat, format = tonumber, setmetatable, table.concat, string.format
local find, sub, lower, byte = string.find, string.sub, string.lower, string.byte

local M = {}

M.MAX_HEAD = 64 * 1024       -- bytes of a status line and headers (libcurl: 100 KB; nginx: 8-32 KB)
M.MAX_CHUNK_LINE = 1024      -- a chunk-size line with its extensions
M.MAX_TRAILERS = 16 * 1024

--- The bytes of a request.  opts.headers: "Name: value" lines (the caller
-- checked them: no CR/LF); Host, Content-Length and Connection are ours.
function M.request(opts)
  local body = opts.body
  local lines = { (opts.method or "GET") .. " " .. opts.target .. " HTTP/1.1", "Host: " .. opts.host }
  local n = 2
  local h = opts.headers
  if h then
    for i = 1, #h do
      local line = h[i]
      local name = lower(line:match("^([^:]*)") or "")
      if name ~= "host" and name ~= "content-length" and name ~= "connection"
          and name ~= "transfer-encoding" then
        n = n + 1
        lines[n] = line
      end
    end
  end
  if body then
    n = n + 1
    lines[n] = "Content-Length: " .. #body
  end
  n = n + 1
  lines[n] = "Connection: keep-alive"
  n = n + 1
  lines[n] = "\r\n"
  return concat(lines, "\r\n", 1, n) .. (body or "")
end

--- scheme, host, port, target of an http(s) URL; nil, message otherwise.
function M.parse_url(url)
  local scheme, rest = url:match("^(https?)://(.*)$")
  if not scheme then return nil, "not an http(s) URL" end
  local authority, target = rest:match("^([^/?#]*)(.*)$")
  target = target:gsub("#.*$", "")
  if target == "" then target = "/" elseif sub(target, 1, 1) == "?" then target = "/" .. target end
  local userinfo = authority:match("^(.*)@")
  if userinfo then authority = authority:sub(#userinfo + 2) end
  local host, port = authority:match("^%[([^%]]+)%]:?(%d*)$")
  if not host then host, port = authority:match("^([^:]+):?(%d*)$") end
  if not host or host == "" then return nil, "no host in the URL" end
  port = port ~= "" and tonumber(port) or (scheme == "https" and 443 or 80)
  if port < 1 or port > 65535 then return nil, "bad port in the URL" end
  return { scheme = scheme, host = host, port = port, target = target, userinfo = userinfo,
    authority = authority }
end

------------------------------------------------------------------ replies

local Parser = {}
Parser.__index = Parser

-- states
local HEAD, BODY_LENGTH, BODY_CLOSE, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, TRAILERS, DONE =
  1, 2, 3, 4, 5, 6, 7, 8

function M.parser(opts)
  opts = opts or {}
  return setmetatable({
    method = opts.method or "GET", max_body = opts.max_body,
    buf = "", pos = 1, state = HEAD, head_done = false, done = false, reusable = false,
    status = false, headers = false, version = false,
    out = {}, nout = 0, nbytes = 0, received = 0, remaining = 0, trailer_bytes = 0, keep = true,
  }, Parser)
end

local function fail(p, kind, msg)
  p.failed = kind
  p.message = msg
  return nil, kind, msg
end

-- Body bytes decoded: counted against max_body, queued for take().
local function emit(p, s)
  if s == "" then return true end
  local got = p.received + #s
  p.received = got
  if p.max_body and got > p.max_body then
    return fail(p, "protocol", format("reply larger than max_body (%d bytes)", p.max_body))
  end
  local n = p.nout + 1
  p.nout = n
  p.out[n] = s
  p.nbytes = p.nbytes + #s
  return true
end

local function finish(p)
  p.state = DONE
  p.done = true
  p.reusable = p.keep and p.pos > #p.buf -- nothing after the reply
  return true
end

-- The header block (without its final empty line) -> status, headers.
local function parse_head(p, block)
  local pos = 1
  local line_end = find(block, "\n", 1, true)
  local status_line = sub(block, 1, (line_end or #block + 1) - 1):gsub("\r$", "")
  local major, minor, code, rest = status_line:match("^HTTP/(%d)%.(%d) (%d%d%d)(.*)$")
  if not major or (rest ~= "" and byte(rest, 1) ~= 32) then
    return fail(p, "protocol", "malformed status line: " .. format("%q", sub(status_line, 1, 80)))
  end
  local headers, last = {}, nil
  pos = line_end and line_end + 1 or #block + 1
  while pos <= #block do
    local e = find(block, "\n", pos, true) or #block + 1
    local line = sub(block, pos, e - 1)
    if byte(line, -1) == 13 then line = sub(line, 1, -2) end
    pos = e + 1
    local first = byte(line, 1)
    if first == 32 or first == 9 then
      -- obsolete line folding (RFC 9112 5.2): the line continues the
      -- previous header's value, joined by one space
      if not last then return fail(p, "protocol", "a folded header line with no header before it") end
      local more = line:match("^[ \t]*(.-)[ \t]*$")
      if more ~= "" then
        headers[last] = headers[last] == "" and more or headers[last] .. " " .. more
      end
    elseif line ~= "" then
      local name, value = line:match("^([^:%s]+):[ \t]*(.-)[ \t]*$")
      if not name then
        return fail(p, "protocol", "malformed header line: " .. format("%q", sub(line, 1, 80)))
      end
      name = lower(name)
      if name == "content-length" and headers[name] and headers[name] ~= value then
        return fail(p, "protocol", "two different Content-Length headers")
      end
      headers[name] = value
      last = name
    end
  end
  p.version = major .. "." .. minor
  return tonumber(code), headers
end

-- The body's framing, from the status and headers (RFC 9112 6.3).
local function start_body(p, status, headers)
  local conn = lower(headers["connection"] or "")
  if p.version == "1.0" then
    p.keep = find(conn, "keep-alive", 1, true) ~= nil
  else
    p.keep = find(conn, "close", 1, true) == nil
  end
  if p.method == "HEAD" or status == 204 or status == 304 then return finish(p) end
  local te = headers["transfer-encoding"]
  if te then
    te = lower(te)
    if not te:match("chunked%s*$") then
      -- any other coding is not framed: the body runs to the close
      p.keep = false
      p.state = BODY_CLOSE
      return true
    end
    -- chunked wins over a Content-Length (a smuggling hint: no reuse)
    if headers["content-length"] then p.keep = false end
    p.state = CHUNK_SIZE
    return true
  end
  local cl = headers["content-length"]
  if cl then
    if not cl:match("^%d+$") or #cl > 15 then
      return fail(p, "protocol", "bad Content-Length: " .. format("%q", sub(cl, 1, 40)))
    end
    local n = tonumber(cl)
    if p.max_body and n > p.max_body then
      return fail(p, "protocol", format("reply larger than max_body (%d bytes): Content-Length %s",
        p.max_body, cl))
    end
    if n == 0 then return finish(p) end
    p.remaining = n
    p.state = BODY_LENGTH
    return true
  end
  p.keep = false
  p.state = BODY_CLOSE
  return true
end

-- Consume p.buf from p.pos as far as it goes.  The bytes consumed are
-- skipped by moving p.pos, never cut off one piece at a time (a read of
-- many small chunks would copy the rest of the buffer once per chunk);
-- run() drops them once, when it is done with what it was given.
local function step(p)
  local buf = p.buf
  while true do
    local st, pos = p.state, p.pos
    local left = #buf - pos + 1
    if st == HEAD then
      local e, stop = find(buf, "\r?\n\r?\n", pos)
      if not e then
        if left > M.MAX_HEAD then return fail(p, "protocol", "reply headers larger than "
          .. M.MAX_HEAD .. " bytes") end
        return true
      end
      if e - pos + 1 > M.MAX_HEAD then
        return fail(p, "protocol", "reply headers larger than " .. M.MAX_HEAD .. " bytes")
      end
      local block = sub(buf, pos, e - 1)
      p.pos = stop + 1
      local status, headers = parse_head(p, block)
      if not status then return nil, headers, p.message end
      if status >= 100 and status < 200 and status ~= 101 then
        -- an interim reply (100 Continue, 103 Early Hints): the real one follows
      else
        p.status, p.headers, p.head_done = status, headers, true
        local ok, kind, msg = start_body(p, status, headers)
        if not ok then return nil, kind, msg end
      end
    elseif st == BODY_LENGTH then
      if left <= 0 then return true end
      local r = p.remaining
      if left <= r then
        p.pos = #buf + 1
        p.remaining = r - left
        local ok, kind, msg = emit(p, pos == 1 and buf or sub(buf, pos))
        if not ok then return nil, kind, msg end
        if p.remaining == 0 then return finish(p) end
        return true
      end
      p.pos = pos + r
      p.remaining = 0
      local ok, kind, msg = emit(p, sub(buf, pos, pos + r - 1))
      if not ok then return nil, kind, msg end
      -- bytes after the body: the server sent more than it announced
      p.keep = false
      return finish(p)
    elseif st == BODY_CLOSE then
      if left <= 0 then return true end
      p.pos = #buf + 1
      local ok, kind, msg = emit(p, pos == 1 and buf or sub(buf, pos))
      if not ok then return nil, kind, msg end
      return true
    elseif st == CHUNK_SIZE then
      local e = find(buf, "\n", pos, true)
      if not e then
        if left > M.MAX_CHUNK_LINE then return fail(p, "protocol", "chunk size line too long") end
        return true
      end
      if e - pos > M.MAX_CHUNK_LINE then return fail(p, "protocol", "chunk size line too long") end
      local line = sub(buf, pos, e - 1)
      p.pos = e + 1
      if byte(line, -1) == 13 then line = sub(line, 1, -2) end
      local hex, ext = line:match("^(%x+)[ \t]*(.*)$")
      if not hex or (ext ~= "" and sub(ext, 1, 1) ~= ";") then
        return fail(p, "protocol", "bad chunk size: " .. format("%q", sub(line, 1, 40)))
      end
      hex = hex:gsub("^0+(.)", "%1")
      if #hex > 12 then return fail(p, "protocol", "chunk size too large: " .. sub(hex, 1, 40)) end
      local n = tonumber(hex, 16)
      if p.max_body and p.received + n > p.max_body then
        return fail(p, "protocol", format("reply larger than max_body (%d bytes)", p.max_body))
      end
      if n == 0 then
        p.state = TRAILERS
      else
        p.remaining = n
        p.state = CHUNK_DATA
      end
    elseif st == CHUNK_DATA then
      if left <= 0 then return true end
      local r = p.remaining
      local piece
      if left <= r then
        piece = pos == 1 and buf or sub(buf, pos)
        p.pos = #buf + 1
      else
        piece = sub(buf, pos, pos + r - 1)
        p.pos = pos + r
      end
      p.remaining = r - #piece
      local ok, kind, msg = emit(p, piece)
      if not ok then return nil, kind, msg end
      if p.remaining > 0 then return true end
      p.state = CHUNK_CRLF
    elseif st == CHUNK_CRLF then
      if left <= 0 or (left == 1 and byte(buf, pos) == 13) then return true end
      local b1 = byte(buf, pos)
      if b1 == 10 then
        p.pos = pos + 1
      elseif b1 == 13 and byte(buf, pos + 1) == 10 then
        p.pos = pos + 2
      else
        return fail(p, "protocol", "chunk data not followed by CRLF")
      end
      p.state = CHUNK_SIZE
    elseif st == TRAILERS then
      local e = find(buf, "\n", pos, true)
      if not e then
        if left + p.trailer_bytes > M.MAX_TRAILERS then return fail(p, "protocol", "trailers too large") end
        return true
      end
      local line = sub(buf, pos, e - 1)
      p.pos = e + 1
      p.trailer_bytes = p.trailer_bytes + (e - pos + 1)
      if p.trailer_bytes > M.MAX_TRAILERS then return fail(p, "protocol", "trailers too large") end
      if line == "" or line == "\r" then return finish(p) end
    else -- DONE: anything more is not ours (a pipelining server would be wrong)
      if left > 0 then p.keep, p.reusable, p.pos = false, false, #buf + 1 end
      return true
    end
  end
end

local function run(p)
  local ok, kind, msg = step(p)
  -- the consumed bytes dropped at once, with one copy of what is left
  local pos, buf = p.pos, p.buf
  if pos > #buf then
    p.buf = ""
  elseif pos > 1 then
    p.buf = sub(buf, pos)
  end
  p.pos = 1
  return ok, kind, msg
end

--- Bytes from the socket: -> true | nil, kind, message
function Parser:feed(s)
  if self.failed then return nil, self.failed, self.message end
  if s == nil or s == "" then return true end
  if self.state == BODY_CLOSE and self.buf == "" then
    local ok, kind, msg = emit(self, s)
    if not ok then return nil, kind, msg end
    return true
  end
  self.buf = self.buf == "" and s or self.buf .. s
  return run(self)
end

--- The body bytes decoded since the last call, or nil.
function Parser:take()
  local n = self.nout
  if n == 0 then return nil end
  local out = self.out
  local s = n == 1 and out[1] or concat(out, "", 1, n)
  for i = 1, n do out[i] = nil end
  self.nout, self.nbytes = 0, 0
  return s
end

--- The peer closed the connection: -> true (the reply is complete) | nil, kind, message
function Parser:eof()
  if self.failed then return nil, self.failed, self.message end
  self.keep, self.reusable = false, false
  local st = self.state
  if st == DONE then return true end
  if st == BODY_CLOSE then return finish(self) end
  if st == HEAD then
    if self.buf:match("^%s*$") then
      return fail(self, "connect", "the connection closed before a reply")
    end
    return fail(self, "connect", "the connection closed inside the reply's headers")
  end
  if st == BODY_LENGTH then
    return fail(self, "connect", format("connection broken mid-reply: closed with %d bytes of the body "
      .. "still to come", self.remaining))
  end
  return fail(self, "connect", "connection broken mid-reply: closed inside the chunked body")
end

M.Parser = Parser
return M
