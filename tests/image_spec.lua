-- slm.image: sizes from PNG/JPEG/GIF/WebP headers (bytes, data: URLs,
-- files), the gpt-4o-mini image token rule, and unknown sizes.
local image = require "slm.image"
local make = require "tests.fixtures.images.make"

local DIR = "tests/fixtures/images/"

local function b64(s, urlsafe, nopad)
  local A = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  if urlsafe then A = A:sub(1, 62) .. "-_" end
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local q = { math.floor(n / 262144) % 64, math.floor(n / 4096) % 64, math.floor(n / 64) % 64, n % 64 }
    local pad = nopad and "" or "="
    out[#out + 1] = A:sub(q[1] + 1, q[1] + 1) .. A:sub(q[2] + 1, q[2] + 1)
      .. (b and A:sub(q[3] + 1, q[3] + 1) or pad) .. (c and A:sub(q[4] + 1, q[4] + 1) or pad)
  end
  return table.concat(out)
end

local function data_url(bytes, mime) return "data:" .. (mime or "image/png") .. ";base64," .. b64(bytes) end

local tmpfiles = {}
local function tmpfile(bytes)
  local p = os.tmpname()
  local f = assert(io.open(p, "wb"))
  f:write(bytes)
  f:close()
  tmpfiles[#tmpfiles + 1] = p
  return p
end
teardown(function() for _, p in ipairs(tmpfiles) do os.remove(p) end end)

describe("image.size", function()
  it("reads the committed fixtures by path, file:// URL and data: URL", function()
    for _, f in ipairs(make.FIXTURES) do
      local name, build, w, h, fmt = f[1], f[2], f[3], f[4], f[5]
      local fh = assert(io.open(DIR .. name, "rb"))
      local bytes = fh:read("a")
      fh:close()
      assert.are.equal(build(), bytes, name .. " differs from what make.lua builds")
      local gw, gh, gf = image.size(bytes)
      assert.are.same({ w, h, fmt }, { gw, gh, gf }, name)
      assert.are.same({ w, h, fmt }, { image.size_of_url(DIR .. name) }, name)
      assert.are.same({ w, h, fmt }, { image.size_of_url("file://" .. DIR .. name) }, name)
      assert.are.same({ w, h, fmt }, { image.size_of_url(data_url(bytes)) }, name)
    end
  end)

  it("reads PNG sizes up to 32 bits", function()
    for _, s in ipairs{ { 1, 1 }, { 17, 3 }, { 4000, 3000 }, { 65536, 2 }, { 100000, 70000 } } do
      assert.are.same({ s[1], s[2], "png" }, { image.size(make.png_header(s[1], s[2])) })
    end
    assert.are.same({ 9, 9, "png" }, { image.size(make.png(9, 9)) })
  end)

  it("reads GIF logical screen sizes", function()
    for _, s in ipairs{ { 1, 1 }, { 300, 200 }, { 65535, 1 } } do
      assert.are.same({ s[1], s[2], "gif" }, { image.size(make.gif(s[1], s[2])) })
    end
    local g87 = "GIF87a" .. make.gif(640, 480):sub(7)
    assert.are.same({ 640, 480, "gif" }, { image.size(g87) })
  end)

  it("finds a JPEG's frame header past APPn, COM, DHT and fill bytes, for every SOFn", function()
    assert.are.same({ 1024, 768, "jpeg" }, { image.size(make.jpeg(1024, 768)) })
    assert.are.same({ 33, 17, "jpeg" },
      { image.size(make.jpeg(33, 17, { app1 = string.rep("\255", 500), com = "hi", fill = true })) })
    -- DHT is FFC4, in the SOFn range but not a frame header
    assert.are.same({ 640, 480, "jpeg" }, { image.size(make.jpeg(640, 480, { dht_first = true })) })
    for _, sof in ipairs{ 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF } do
      assert.are.same({ 200, 100, "jpeg" }, { image.size(make.jpeg(200, 100, { sof = sof })) })
    end
  end)

  it("reads WebP lossy (VP8), lossless (VP8L) and extended (VP8X) sizes", function()
    assert.are.same({ 40, 30, "webp" }, { image.size(make.webp_lossy(40, 30)) })
    assert.are.same({ 16383, 16383, "webp" }, { image.size(make.webp_lossy(16383, 16383)) })
    for _, s in ipairs{ { 1, 1 }, { 7, 3 }, { 1000, 1 }, { 16384, 16384 }, { 300, 9000 } } do
      assert.are.same({ s[1], s[2], "webp" }, { image.size(make.webp_lossless(s[1], s[2])) })
      assert.are.same({ s[1], s[2], "webp" }, { image.size(make.webp_extended(s[1], s[2])) })
    end
    assert.are.same({ 20000, 1, "webp" }, { image.size(make.webp_extended(20000, 1)) })
  end)

  it("says truncated, unknown or corrupt", function()
    local jpg = make.jpeg(64, 64, { app1 = string.rep("x", 1000) })
    local w, err, code = image.size(jpg:sub(1, 100))
    assert.is_nil(w); assert.is_string(err); assert.are.equal("truncated", code)
    assert.are.equal("truncated", select(3, image.size(make.png(4, 4):sub(1, 20))))
    assert.are.equal("truncated", select(3, image.size("GIF89a\1")))
    assert.are.equal("truncated", select(3, image.size(make.webp_lossless(5, 5):sub(1, 22))))
    assert.are.equal("unknown", select(3, image.size("%PDF-1.7 this is not an image")))
    assert.are.equal("corrupt", select(3, image.size("\255\216\255\218\0\8")))        -- scan before frame
    assert.are.equal("corrupt", select(3, image.size("\255\216\0\0\0\0\0\0\0\0\0\0")))  -- no marker
    local badpng = make.png(4, 4):gsub("IHDR", "IXXX", 1)
    assert.are.equal("corrupt", select(3, image.size(badpng)))
    assert.has_error(function() image.size(nil) end)
  end)

  it("reads a JPEG whose frame header lies past the first 64 KiB (file and data: URL)", function()
    local big = string.rep("e", 60000)
    -- two ~60 KB APP1 segments: the SOF starts after byte 120,000
    local jpg = make.jpeg(3000, 2000, { app1 = big }):gsub("\255\224", "\255\224", 1)
    local pos = jpg:find("\255\225", 1, true)
    local app1_len = jpg:byte(pos + 2) * 256 + jpg:byte(pos + 3)
    local app1 = jpg:sub(pos, pos + 1 + app1_len)
    jpg = jpg:sub(1, pos - 1) .. app1 .. app1 .. jpg:sub(pos + 2 + app1_len)
    assert.is_true(jpg:find("\255\192", 1, true) > 120000)
    assert.are.same({ 3000, 2000, "jpeg" }, { image.size(jpg) })
    assert.are.same({ 3000, 2000, "jpeg" }, { image.size_of_url(tmpfile(jpg)) })
    assert.are.same({ 3000, 2000, "jpeg" }, { image.size_of_url(data_url(jpg, "image/jpeg")) })
  end)

  it("encodes base64 in C, round-tripping every length and byte (RFC 4648 vectors too)", function()
    local core = require "slm.core"
    local vectors = { [""] = "", f = "Zg==", fo = "Zm8=", foo = "Zm9v", foob = "Zm9vYg==", fooba = "Zm9vYmE=",
      foobar = "Zm9vYmFy" }
    for plain, enc in pairs(vectors) do
      assert.are.equal(enc, image.base64_encode(plain))
      assert.are.equal(plain, core.base64_decode(enc))
    end
    math.randomseed(7)
    for n = 0, 300 do
      local t = {}
      for i = 1, n do t[i] = string.char(math.random(0, 255)) end
      local bytes = table.concat(t)
      assert.are.equal(bytes, image.base64_decode(image.base64_encode(bytes)), "length " .. n)
    end
    assert.are.same({ nil, "invalid base64" }, { core.base64_decode("ab$c") })
    assert.is_nil(core.base64_decode("A")) -- a lone character cannot be a byte
    assert.has_error(function() core.base64_encode(nil) end)
    assert.has_error(function() core.base64_decode("YQ==", -1) end)
  end)

  it("decodes base64 with or without padding, in either alphabet, with line breaks", function()
    local bytes = make.png(5, 3)
    for _, enc in ipairs{ b64(bytes), b64(bytes, true), b64(bytes, false, true) } do
      assert.are.equal(bytes, image.base64_decode(enc))
      assert.are.equal(bytes, image.base64_decode((enc:gsub("(" .. string.rep(".", 76) .. ")", "%1\n"))))
    end
    assert.are.equal("abc", image.base64_decode("YWJjZGVm", 3))
    assert.is_nil(image.base64_decode("not*base64"))
  end)

  it("cannot know a remote image's size, nor a non-base64 data: URL's", function()
    local w, err, code = image.size_of_url("https://example.invalid/cat.jpg")
    assert.is_nil(w); assert.is_string(err); assert.are.equal("remote", code)
    assert.is_nil((image.size_of_url("data:image/svg+xml,%3Csvg%3E")))
    assert.is_nil((image.size_of_url("/no/such/dir/cat.png")))
  end)
end)

describe("image.tokens (gpt-4o-mini: 2833 + 5667 per 512 px tile)", function()
  -- { w, h, scaled w, scaled h, tiles }, worked by hand from the rule:
  -- fit in 2048 x 2048, then shortest side down to 768, then 512 px tiles.
  local CASES = {
    { 1024, 1024, 768, 768, 4 },    -- OpenAI's example: no fit step, 1024 -> 768
    { 2048, 4096, 768, 1536, 6 },   -- OpenAI's example: -> 1024 x 2048 -> 768 x 1536
    { 4096, 8192, 768, 1536, 6 },
    { 512, 512, 512, 512, 1 },      -- never scaled up
    { 512, 513, 512, 513, 2 },
    { 1, 1, 1, 1, 1 },
    { 768, 768, 768, 768, 4 },
    { 1536, 768, 1536, 768, 6 },
    { 768, 2048, 768, 2048, 8 },    -- the worst case
    { 3000, 1000, 2048, 683, 8 },   -- 1000 * 2048 / 3000 = 682.67, rounded up
    { 100, 5000, 41, 2048, 4 },     -- 100 * 2048 / 5000 = 40.96 -> 41
    { 1920, 1080, 1366, 768, 6 },   -- 1920 * 768 / 1080 = 1365.33 -> 1366
    { 4032, 3024, 1024, 768, 4 },   -- phone photo: -> 2048 x 1536 -> 1024 x 768
  }
  for _, c in ipairs(CASES) do
    it(("%dx%d high -> %dx%d -> %d tiles"):format(c[1], c[2], c[3], c[4], c[5]), function()
      local n, tiles, sw, sh = image.tokens(c[1], c[2], "high")
      assert.are.same({ c[3], c[4], c[5] }, { sw, sh, tiles })
      assert.are.equal(2833 + 5667 * c[5], n)
      assert.are.equal(n, (image.tokens(c[1], c[2], "auto")))
      assert.are.equal(n, (image.tokens(c[1], c[2], nil)))
      assert.are.equal(n, (image.tokens(c[2], c[1], "high"))) -- orientation does not matter
    end)
  end

  it("gives the numbers above for the worked examples", function()
    assert.are.equal(25501, (image.tokens(1024, 1024, "high")))
    assert.are.equal(36835, (image.tokens(2048, 4096, "high")))
    assert.are.equal(8500, (image.tokens(512, 512, "high")))
    assert.are.equal(48169, image.worst_tokens())
  end)

  it("charges the base alone at low detail, whatever the size", function()
    assert.are.equal(2833, (image.tokens(4096, 8192, "low")))
    assert.are.equal(2833, (image.tokens(1, 1, "low")))
  end)

  it("takes other prices: gpt-4o's 85 + 170 reproduce OpenAI's 765 and 1105", function()
    local gpt4o = { base = 85, tile = 170 }
    assert.are.equal(765, (image.tokens(1024, 1024, "high", gpt4o)))
    assert.are.equal(1105, (image.tokens(2048, 4096, "high", gpt4o)))
    assert.are.equal(85, (image.tokens(4096, 8192, "low", gpt4o)))
  end)

  it("raises on misuse", function()
    assert.has_error(function() image.tokens(0, 10, "high") end)
    assert.has_error(function() image.tokens("1", 10, "high") end)
  end)
end)

describe("image.count", function()
  it("counts a data: URL, a path and a file:// URL by their real size", function()
    local n, info = image.count(data_url(make.jpeg(1024, 1024), "image/jpeg"))
    assert.are.equal(25501, n)
    assert.is_false(info.estimate)
    assert.are.same({ 1024, 1024, "jpeg", 4 }, { info.width, info.height, info.format, info.tiles })
    assert.are.equal(36835, (image.count(DIR .. "wide.jpg", "high")))       -- 2048x4096: 6 tiles
    assert.are.equal(36835, (image.count("file://" .. DIR .. "wide.jpg")))
    assert.are.equal(8500, (image.count(DIR .. "tiny.png")))                 -- 3x2: 1 tile
    assert.are.equal(2833, (image.count(DIR .. "wide.jpg", "low")))
  end)

  it("counts an image of unknown size as the worst case (768x2048, 8 tiles) with estimate", function()
    for _, url in ipairs{ "https://example.invalid/cat.png", "/no/such/file.png", "data:image/png;base64,AAAA" } do
      local n, info = image.count(url, "high")
      assert.are.equal(2833 + 8 * 5667, n, url)
      assert.is_true(info.estimate, url)
      assert.is_string(info.reason, url)
    end
    -- low detail needs no size: exact
    local n, info = image.count("https://example.invalid/cat.png", "low")
    assert.are.equal(2833, n)
    assert.is_false(info.estimate)
  end)
end)
