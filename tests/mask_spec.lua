-- A client's personal-data masking (mask_pii), over real HTTP against the
-- simulator, whose plain replies echo the last user message: what the
-- simulator received must hold placeholders only, and what the caller
-- gets back (text, streamed deltas, tool call arguments, an error's
-- partial reply) the original values.
local H = require "tests.helpers"
local slm = require "slm"

local up
setup(function() up = H.upstream() end)
teardown(function() if up then up:stop() end end)

local EMAIL, PHONE, CARD = "ivan.petrov@example.com", "+7 912 345-67-89", "4111 1111 1111 1111"
local TEXT = ("Write to %s or call %s; my card %s was charged twice."):format(EMAIL, PHONE, CARD)

local function sent() return H.last(up).body end
local function user_text(body) return body.messages[#body.messages].content end

describe("mask_pii on a client", function()
  it("sends placeholders, gives back the values, counts what it masked", function()
    local c = H.sim_client(up, { mask_pii = true })
    local msgs = { { role = "user", content = TEXT } }
    local res = assert(c:chat{ messages = msgs })
    local got = user_text(sent())
    assert.is_nil(got:find(EMAIL, 1, true))
    assert.is_nil(got:find("4111", 1, true))
    assert.is_nil(got:find("345-67-89", 1, true))
    assert.matches("%[EMAIL_1%]", got)
    assert.matches("%[PHONE_1%]", got)
    assert.matches("%[CARD_1%]", got)
    assert.are.equal("Echo: " .. TEXT, res.text)
    assert.are.equal("Echo: " .. TEXT, res.choices[1].text)
    assert.are.equal("Echo: " .. TEXT, res.message.content)
    assert.are.equal(1, res.masked.email)
    assert.are.equal(1, res.masked.phone)
    assert.are.equal(1, res.masked.card)
    assert.are.equal(0, res.masked.iban)
    -- the caller's messages are left as they were
    assert.are.equal(TEXT, msgs[1].content)
  end)

  it("streams whole values: no delta shows half a placeholder", function()
    local c = H.sim_client(up, { mask_pii = true })
    for _, two in ipairs{ false, true } do
      local deltas = {}
      local cb = two and function(t, _) deltas[#deltas + 1] = t end or function(t) deltas[#deltas + 1] = t end
      local res = assert(c:chat{ messages = H.msgs(TEXT), stream = true, on_delta = cb })
      assert.is_true(#deltas > 5) -- the simulator streams ~4-byte pieces
      local joined = table.concat(deltas)
      assert.are.equal("Echo: " .. TEXT, joined)
      assert.are.equal(joined, res.text)
      for _, d in ipairs(deltas) do
        assert.is_nil(d:find("[", 1, true), d)
        assert.is_nil(d:find("_%d"), d)
      end
    end
    local s = c:stream{ messages = H.msgs(TEXT) }
    local parts = {}
    for t in s do parts[#parts + 1] = t end
    assert.are.equal("Echo: " .. TEXT, table.concat(parts))
    local res = assert(s:result())
    assert.are.equal("Echo: " .. TEXT, res.text)
    assert.are.equal(1, res.masked.card)
  end)

  it("masks a value split across text parts or messages: nothing of it is sent, the reply has it once", function()
    local c = H.sim_client(up, { mask_pii = true })
    local msgs = { { role = "user", content = {
      { type = "text", text = "my card is 4111 1111" }, { type = "text", text = " 1111 1111, mail ivan.petrov" },
      { type = "text", text = "@example.com" } } } }
    local res = assert(c:chat{ messages = msgs })
    local body = sent()
    local got = body.messages[1].content
    local joined = got[1].text .. got[2].text .. got[3].text
    assert.are.equal("my card is [CARD_1], mail [EMAIL_1]", joined)
    assert.is_nil(require("slm.json").encode(body):find("1111", 1, true))
    -- (the simulator reads the parts with line breaks between)
    assert.are.equal("Echo: my card is 4111 1111 1111 1111, mail ivan.petrov@example.com", (res.text:gsub("\n", "")))
    assert.are.equal(1, res.masked.card)
    assert.are.equal(1, res.masked.email)
    assert.are.equal(" 1111 1111, mail ivan.petrov", msgs[1].content[2].text) -- the caller's as it was
    -- a phone cut between two user messages
    res = assert(c:chat{ messages = { { role = "user", content = "call me at +7 912" },
      { role = "user", content = "345-67-89, please" } } })
    body = sent()
    assert.are.equal("call me at [PHONE_1]", body.messages[1].content)
    assert.are.equal(", please", body.messages[2].content)
    assert.is_nil(require("slm.json").encode(body):find("912", 1, true))
    assert.are.equal("Echo: , please", res.text)
  end)

  it("unmasks tool call arguments", function()
    local c = H.sim_client(up, { mask_pii = true })
    local res = assert(c:chat{ messages = H.msgs("Look up the order of " .. EMAIL),
      tools = { { type = "function", ["function"] = { name = "lookup_order", parameters = { type = "object",
        properties = { query = { type = "string" } } } } } } })
    assert.matches("%[EMAIL_1%]", sent().messages[1].content)
    local args = require("slm.json").decode(res.tool_calls[1]["function"].arguments)
    assert.are.equal("Look up the order of " .. EMAIL, args.query)
  end)

  it("a request's mask_pii wins over the client's", function()
    local off = H.sim_client(up, { mask_pii = true })
    off:chat{ messages = H.msgs(TEXT), mask_pii = false }
    assert.are.equal(TEXT, user_text(sent()))
    local on = H.sim_client(up)
    local res = assert(on:chat{ messages = H.msgs(TEXT), mask_pii = { kinds = { "email" } } })
    local got = user_text(sent())
    assert.matches("%[EMAIL_1%]", got)
    assert.truthy(got:find(CARD, 1, true)) -- only e-mails were asked for
    assert.are.equal("Echo: " .. TEXT, res.text)
  end)

  it("an error's partial reply is unmasked too", function()
    local c = H.sim_client(up, { mask_pii = true, max_retries = 0,
      headers = { ["X-Sim-Scenario"] = "error_chunk" } })
    local deltas = {}
    local res, err = c:chat{ messages = H.msgs(EMAIL .. " " .. EMAIL), stream = true,
      on_delta = function(t) deltas[#deltas + 1] = t end }
    assert.is_nil(res)
    assert.is_table(err.partial)
    -- what the caller was handed, and nothing of a placeholder the break cut
    assert.are.equal(table.concat(deltas), err.partial.text)
    assert.is_nil(err.partial.text:find("[", 1, true))
    assert.is_truthy(("Echo: " .. EMAIL):find(err.partial.text, 1, true))
    assert.are.equal(1, err.masked.email)
  end)

  it("misuse raises naming the option", function()
    assert.has_error(function() slm.client{ mask_pii = "yes" } end,
      "slm.client: option 'mask_pii' must be a boolean or a slm.pii options table, got string")
    assert.has_error(function() slm.client{ mask_pii = { kinds = { "dna" } } } end)
    local c = H.sim_client(up)
    assert.has_error(function() c:chat{ messages = H.msgs("x"), mask_pii = 1 } end,
      "slm: client:chat: option 'mask_pii' must be a boolean or a slm.pii options table, got number")
  end)
end)
