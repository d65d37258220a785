--- slm.image: image sizes from file headers, and what an image costs in
-- prompt tokens.
--
--   local image = require "slm.image"
--   image.size(bytes)            -> w, h, format | nil, err, code
--   image.size_of_url(url)       -> w, h, format | nil, err, code
--   image.tokens(w, h, detail, costs) -> tokens, tiles, scaled_w, scaled_h
--   image.count(url, detail, costs)   -> tokens, info
--
-- Sizes are read by hand from the headers of PNG (IHDR), JPEG (the first
-- SOFn marker, scanning the segments before it), GIF (logical screen) and
-- WebP (VP8, VP8L and VP8X chunks).  `code` in an error is "truncated" (not
-- enough bytes: read more and try again), "unknown" (not one of these
-- formats) or "corrupt"; for a local file also "unreadable" (it cannot be
-- read: no such file, no permission) and "not_regular" (a FIFO, a device,
-- a directory or a socket: refused without being opened, since a FIFO's
-- open blocks for ever without a writer and /dev/zero never ends).
--
-- The token rule is OpenAI's published one for gpt-4o-mini:
--   detail "low": BASE tokens, whatever the size;
--   detail "high" or "auto" (auto is counted as high: the worst case):
--     1. scale down to fit in a 2048 x 2048 square (aspect ratio kept);
--     2. scale down so that the shortest side is 768 px;
--     3. count the 512 px tiles that cover the result: BASE + TILE * tiles.
--   gpt-4o-mini: BASE = 2833, TILE = 5667.
-- Images are only ever scaled down, never up (a 512 x 512 image is one
-- tile).  Scaled sides are rounded up, so a side that lands a fraction of
-- a pixel past a tile boundary costs the extra tile (never under-counted).
--
-- An image whose size cannot be known before sending (an http(s) URL, an
-- unreadable file, an unknown format) counts as the worst case of the
-- rule: after the two scaling steps no image is larger than 768 x 2048,
-- which is 2 x 4 = 8 tiles, so BASE + 8 * TILE = 48,169 tokens for
-- gpt-4o-mini; info.estimate is then true.
--
-- Lua, 5.1/LuaJIT and 5.4 alike (no bit operators, no integer division);
-- base64 is slm.core's.  Reading a local file is the only I/O: the first
-- bytes of a regular file only (slm.core.read_head), 16 MB at the most.
local core = require "slm.core"
local type, tonumber, tostring, error = type, tonumber, tostring, error
local byte, sub, char, find, format = string.byte, string.sub, string.char, string.find, string.format
local floor, ceil = math.floor, math.ceil
local concat = table.concat

local M = {}

--- gpt-4o-mini's image prices in tokens (a model entry may override them
-- with `image_base` and `image_tile`).
M.BASE = 2833
M.TILE = 5667
M.FIT = 2048        -- step 1: fit in FIT x FIT
M.SHORT = 768       -- step 2: shortest side at most SHORT
M.TILE_PX = 512     -- step 3: tile size
--- the largest image after scaling (the worst case)
M.WORST_W, M.WORST_H = 768, 2048

------------------------------------------------------------------ headers

local function u16be(s, i) local a, b = byte(s, i, i + 1); return a * 256 + b end
local function u16le(s, i) local a, b = byte(s, i, i + 1); return b * 256 + a end
local function u24le(s, i) local a, b, c = byte(s, i, i + 2); return c * 65536 + b * 256 + a end
local function u32be(s, i)
  local a, b, c, d = byte(s, i, i + 3)
  return ((a * 256 + b) * 256 + c) * 256 + d
end

local function png(s)
  -- signature(8) length(4) "IHDR"(4) width(4) height(4)
  if #s < 24 then return nil, "truncated PNG header", "truncated" end
  if sub(s, 13, 16) ~= "IHDR" then return nil, "PNG without an IHDR chunk first", "corrupt" end
  local w, h = u32be(s, 17), u32be(s, 21)
  if w == 0 or h == 0 then return nil, "PNG with a zero size", "corrupt" end
  return w, h, "png"
end

local function gif(s)
  -- "GIF87a"/"GIF89a", logical screen width and height (little endian)
  if #s < 10 then return nil, "truncated GIF header", "truncated" end
  local w, h = u16le(s, 7), u16le(s, 9)
  if w == 0 or h == 0 then return nil, "GIF with a zero size", "corrupt" end
  return w, h, "gif"
end

-- SOFn markers (frame headers) carry the size; C4 (DHT), C8 (JPG) and CC
-- (DAC) share the range but are not frames.
local function is_sof(m)
  return m >= 0xC0 and m <= 0xCF and m ~= 0xC4 and m ~= 0xC8 and m ~= 0xCC
end

local function jpeg(s)
  local n = #s
  local i = 3 -- after SOI (FF D8)
  while true do
    if i > n then return nil, "truncated JPEG before its frame header", "truncated" end
    if byte(s, i) ~= 0xFF then return nil, "JPEG segment does not start with FF", "corrupt" end
    -- any number of FF fill bytes may precede a marker
    while i <= n and byte(s, i) == 0xFF do i = i + 1 end
    if i > n then return nil, "truncated JPEG before its frame header", "truncated" end
    local m = byte(s, i)
    i = i + 1
    if m == 0xD8 or m == 0x01 or (m >= 0xD0 and m <= 0xD7) then
      -- standalone markers: no length
    elseif m == 0xD9 or m == 0xDA then
      return nil, "JPEG without a frame header before its scan", "corrupt"
    else
      if i + 1 > n then return nil, "truncated JPEG segment", "truncated" end
      local len = u16be(s, i)
      if len < 2 then return nil, "JPEG segment with a bad length", "corrupt" end
      if is_sof(m) then
        -- length(2) precision(1) height(2) width(2)
        if i + 6 > n then return nil, "truncated JPEG frame header", "truncated" end
        local h, w = u16be(s, i + 3), u16be(s, i + 5)
        if w == 0 then return nil, "JPEG with a zero width", "corrupt" end
        -- h == 0 means "defined later by a DNL marker": rare, unsupported
        if h == 0 then return nil, "JPEG whose height is given by a DNL marker", "corrupt" end
        return w, h, "jpeg"
      end
      i = i + len
    end
  end
end

local function webp(s)
  -- "RIFF" size(4) "WEBP", then the first chunk: fourcc(4) size(4) data
  if #s < 30 then return nil, "truncated WebP header", "truncated" end
  local fourcc = sub(s, 13, 16)
  if fourcc == "VP8 " then
    -- frame tag(3), start code 9D 01 2A, width(14 bits) + scale(2), height likewise
    if sub(s, 24, 26) ~= "\157\1\42" then return nil, "WebP VP8 without a start code", "corrupt" end
    local w, h = u16le(s, 27) % 16384, u16le(s, 29) % 16384
    if w == 0 or h == 0 then return nil, "WebP with a zero size", "corrupt" end
    return w, h, "webp"
  elseif fourcc == "VP8L" then
    -- signature 0x2F, then 14 bits width-1, 14 bits height-1 (LSB first)
    if byte(s, 21) ~= 0x2F then return nil, "WebP VP8L without its signature", "corrupt" end
    local b1, b2, b3, b4 = byte(s, 22, 25)
    local w = b1 + (b2 % 64) * 256 + 1
    local h = floor(b2 / 64) + b3 * 4 + (b4 % 16) * 1024 + 1
    return w, h, "webp"
  elseif fourcc == "VP8X" then
    -- flags(1) reserved(3) canvas width-1 (24 bits) canvas height-1 (24 bits)
    return u24le(s, 25) + 1, u24le(s, 28) + 1, "webp"
  end
  return nil, "WebP with an unknown first chunk '" .. fourcc .. "'", "corrupt"
end

--- Size of an image from its first bytes: w, h, format ("png", "jpeg",
-- "gif", "webp") | nil, err, code ("truncated", "unknown", "corrupt").
function M.size(s)
  if type(s) ~= "string" then error("image.size: expected a string of bytes, got " .. type(s), 2) end
  if sub(s, 1, 8) == "\137PNG\r\n\26\n" then return png(s) end
  if sub(s, 1, 2) == "\255\216" then return jpeg(s) end
  if sub(s, 1, 6) == "GIF87a" or sub(s, 1, 6) == "GIF89a" then return gif(s) end
  if sub(s, 1, 4) == "RIFF" and sub(s, 9, 12) == "WEBP" then return webp(s) end
  if #s < 12 then return nil, "too few bytes to tell the image format", "truncated" end
  return nil, "not a PNG, JPEG, GIF or WebP image", "unknown"
end

------------------------------------------------------------------ base64

--- Decode base64 (standard or URL alphabet; whitespace ignored; padding
-- optional), in C (slm.core, shared with the tokenizer's vocabulary loader).
-- Decodes at least the first `max` bytes when given (a prefix is enough
-- for a header).  Returns nil, err on a character outside the alphabet.
function M.base64_decode(s, max)
  return core.base64_decode(s, max)
end

--- Encode bytes as base64 (standard alphabet, padded), in C.
function M.base64_encode(s)
  return core.base64_encode(s)
end

------------------------------------------------------------------ sources

-- Try a growing prefix: most headers sit in the first bytes; a JPEG's
-- frame header may follow large EXIF/ICC segments.
local PREFIXES = { 4096, 65536, 1048576 }

-- The first `max` bytes (at least; all of them when max is nil) of the
-- base64 in url[start..]: bytes, whole (true when nothing is left to
-- decode) | nil, err.  Only a slice of the text is copied and decoded, so
-- reading the header of a gigabyte data: URL costs a few kilobytes, not
-- another gigabyte of copies and scratch.
local function decode_from(url, start, max)
  local left = #url - start + 1
  if not max then
    local bytes, derr = M.base64_decode(sub(url, start))
    return bytes, derr or true
  end
  local chars = ceil(max / 3) * 4
  while true do
    if chars >= left then
      local bytes, derr = M.base64_decode(sub(url, start), max)
      if not bytes then return nil, derr end
      return bytes, #bytes < max
    end
    -- a slice: whitespace out, cut to whole 4-character groups (a lone
    -- character at its end is not an error of the URL's)
    local slice = sub(url, start, start + chars - 1):gsub("[ \t\r\n]", "")
    slice = sub(slice, 1, #slice - #slice % 4)
    local bytes, derr = M.base64_decode(slice, max)
    if not bytes then return nil, derr end
    if #bytes >= max then return bytes, false end
    if slice:find("=", 1, true) then return bytes, true end -- decoding stops at padding
    chars = chars * 2 -- mostly whitespace: a longer slice
  end
end

local function size_of_data_url(url)
  local comma = url:find(",", 6, true)
  if not comma then return nil, "malformed data: URL", "corrupt" end
  local meta = sub(url, 6, comma - 1)
  if not meta:find(";base64", 1, true) then
    return nil, "data: URL without base64 (cannot read its size)", "unknown"
  end
  for p = 1, #PREFIXES + 1 do
    local max = PREFIXES[p]
    local bytes, whole = decode_from(url, comma + 1, max)
    if not bytes then return nil, "data: URL: " .. tostring(whole), "corrupt" end
    local w, h, f = M.size(bytes)
    if w then return w, h, f end
    if f ~= "truncated" or whole then return nil, h, f end
  end
end

-- A local file's header: its first 64 KB, then up to MAX_FILE_HEAD when
-- a JPEG's frame header comes late (past that its size counts as
-- unknown).  Only a regular file is read: slm.core.read_head refuses a
-- FIFO (whose open would block without a writer), a device (/dev/zero
-- never ends), a directory or a socket without opening it.
M.MAX_FILE_HEAD = 16 * 1048576

-- a path in a message: quoted, at most 120 bytes of it
local function shown(path)
  if #path > 120 then path = sub(path, 1, 120) .. "..." end
  return format("%q", path)
end

local function size_of_file(path)
  if find(path, "\0", 1, true) then return nil, "image path with a NUL byte: not read", "unreadable" end
  local max = 65536
  while true do
    local head, err, kind = core.read_head(path, max)
    if not head and kind then
      return nil, "image file " .. shown(path) .. " is " .. tostring(err) .. ": not read", "not_regular"
    end
    if not head then return nil, "cannot read image file " .. shown(path) .. ": " .. tostring(err), "unreadable" end
    local w, h, f = M.size(head)
    if w or f ~= "truncated" or #head < max or max >= M.MAX_FILE_HEAD then return w, h, f end
    max = max * 4
    if max > M.MAX_FILE_HEAD then max = M.MAX_FILE_HEAD end
  end
end

local function unescape(s)
  return (s:gsub("%%(%x%x)", function(x) return char(tonumber(x, 16)) end))
end

--- What kind of source a URL names: "data", "file", "remote" or "unknown".
function M.source(url)
  if type(url) ~= "string" then return "unknown" end
  if url:sub(1, 5) == "data:" then return "data" end
  if url:sub(1, 7) == "file://" then return "file" end
  if url:match("^[%a][%w+.-]*://") then return "remote" end
  return "file" -- a plain local path
end

--- Size of the image a URL names: a data: URL (base64), a file:// URL or
-- a plain local path.  Remote URLs cannot be read before sending:
-- nil, err, "remote".  A local path that is not a regular file: nil, err,
-- "not_regular", without opening it.
function M.size_of_url(url)
  if type(url) ~= "string" then error("image.size_of_url: expected a string, got " .. type(url), 2) end
  local src = M.source(url)
  if src == "data" then return size_of_data_url(url) end
  if src == "file" then
    local path = url
    if url:sub(1, 7) == "file://" then
      path = unescape(url:sub(8))
      -- file://host/path: only the local host is meaningful
      if path:sub(1, 9) == "localhost" then path = path:sub(10) end
    end
    return size_of_file(path)
  end
  return nil, "the size of a remote image is not known before sending", "remote"
end

------------------------------------------------------------------ tokens

-- x * num / den rounded up, exact for integers
local function scale_up(x, num, den)
  return ceil(x * num / den)
end

--- Tokens of one image of w x h pixels.  detail: "low", "high" or "auto"
-- (counted as high).  costs: { base = , tile = } (default gpt-4o-mini's).
-- Returns tokens, tiles, scaled_w, scaled_h.
function M.tokens(w, h, detail, costs)
  if type(w) ~= "number" or type(h) ~= "number" or w <= 0 or h <= 0 then
    error("image.tokens: width and height must be positive numbers", 2)
  end
  local base = costs and costs.base or M.BASE
  local tile = costs and costs.tile or M.TILE
  if detail == "low" then return base, 0, w, h end
  -- 1. fit in FIT x FIT
  local fit = M.FIT
  if w > fit or h > fit then
    if w >= h then
      h, w = scale_up(h, fit, w), fit
    else
      w, h = scale_up(w, fit, h), fit
    end
  end
  -- 2. shortest side down to SHORT
  local short = M.SHORT
  if w <= h then
    if w > short then h, w = scale_up(h, short, w), short end
  else
    if h > short then w, h = scale_up(w, short, h), short end
  end
  -- 3. tiles
  local px = M.TILE_PX
  local tiles = ceil(w / px) * ceil(h / px)
  return base + tile * tiles, tiles, w, h
end

--- The worst case of the rule (an image of unknown size, high detail).
function M.worst_tokens(costs)
  return (M.tokens(M.WORST_W, M.WORST_H, "high", costs))
end

--- Tokens of the image a URL names, with info:
-- { estimate, min, width, height, format, tiles, detail, reason, source,
--   code (size_of_url's, when the size is unknown) }.
-- Low detail is exact whatever the source.  An unknown size counts as the
-- worst case (info.estimate = true, info.reason says why) and info.min is
-- the least it can cost (one tile); for a known size info.min is the count.
function M.count(url, detail, costs)
  detail = detail or "auto"
  if detail == "low" then
    local t = M.tokens(1, 1, "low", costs)
    return t, { estimate = false, detail = "low", tiles = 0, min = t }
  end
  local w, h, fmt = nil, nil, nil
  if type(url) == "string" then w, h, fmt = M.size_of_url(url) end
  if not w then
    local t, tiles = M.tokens(M.WORST_W, M.WORST_H, "high", costs)
    local why = type(url) == "string" and tostring(h) or "image part without a URL"
    return t, { estimate = true, detail = detail, tiles = tiles, reason = why, source = M.source(url),
      code = type(url) == "string" and fmt or nil, min = (M.tokens(1, 1, "high", costs)) }
  end
  local t, tiles, sw, sh = M.tokens(w, h, detail, costs)
  return t, { estimate = false, detail = detail, width = w, height = h, format = fmt,
    tiles = tiles, scaled_width = sw, scaled_height = sh, min = t }
end

return M
