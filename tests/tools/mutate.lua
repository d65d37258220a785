-- tests/tools/mutate.lua: the runners of the mutation tools. M.run breaks
-- one Lua module of lua/ and runs its spec (mutate_schema.lua,
-- mutate_support.lua); M.run_tree (below) breaks any file of a copy of the
-- tree, C included, and builds it (mutate_json.lua, mutate_csv.lua):
--
--   os.exit(require("tests.tools.mutate").run{
--     module = "slm/schema.lua",          -- under lua/
--     spec = "tests/schema_spec.lua",
--     mutations = { { "what it breaks", "text", "replacement" [, "text", "replacement" ...], only = "spec name part" }, ... },
--     scratch = "slm-mutate-schema",      -- a directory under $TMPDIR
--     strip = "slm%.schema ",             -- taken out of the failing specs' names in the report
--     timeout = 60,                       -- seconds a run may take
--     lua = "lua5.4", cpath = root .. "/build/?.so",
--   }, arg)
--
-- A mutation is literal replacements, each of a text found exactly once;
-- the broken copy goes to the scratch directory, which comes first on the
-- spec's package.path (so child processes the spec starts use it too);
-- the rest of lua/ is used as it is. Prints what each mutation made fail,
-- then the specs no mutation made fail. A mutation with `only` runs just
-- the specs it names, and running out of time counts as failing them (for
-- mutations that make something slow). Returns the exit status: 1 when a
-- mutation broke nothing, no longer applies (the code moved on: update
-- it) or a spec never failed; arguments (numbers) pick mutations.
local root = debug.getinfo(1, "S").source:match("^@(.*)/tests/tools/") or "."
package.path = root .. "/?.lua;" .. package.path
local H = require "tests.helpers"
local q = H.q

local M = { root = root }

local function sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  local ok, _, code = p:close()
  return ok, out, code
end

-- The source with m's replacements, or nil when a text is missing or not unique.
local function mutate(source, m)
  local text = source
  for j = 2, #m, 2 do
    local a = text:find(m[j], 1, true)
    if not a or text:find(m[j], a + 1, true) then return nil end
    text = text:sub(1, a - 1) .. m[j + 1] .. text:sub(a + #m[j])
  end
  return text
end

-- After a full run: the specs no mutation made fail; true when there are any.
local function never_failed(specs, failed_once, mutations)
  local never = {}
  for _, name in ipairs(specs) do
    if not failed_once[name] then never[#never + 1] = name end
  end
  print(("\n%d specs, %d mutations; %d specs never failed%s"):format(#specs, mutations, #never,
    #never > 0 and ":" or ""))
  for _, name in ipairs(never) do print("  " .. name) end
  return #never > 0
end

function M.run(o, argv)
  local lua = o.lua or "lua5.4"
  local cpath = o.cpath or (root .. "/build/?.so")
  local scratch = (os.getenv("TMPDIR") or "/tmp") .. "/" .. o.scratch
  local lpath = scratch .. "/?.lua;" .. root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. root .. "/?.lua"
  local function busted(extra)
    return "cd " .. q(root) .. " && timeout " .. (o.timeout or 60) .. " " .. lua .. " /usr/bin/busted --lpath="
      .. q(lpath) .. " --cpath=" .. q(cpath) .. " -o TAP " .. (extra or "") .. " " .. o.spec
  end
  local width = 0
  for _, m in ipairs(o.mutations) do width = math.max(width, #m[1]) end

  local wanted = {}
  for _, a in ipairs(argv or {}) do wanted[tonumber(a)] = true end

  local source = H.read_file(root .. "/lua/" .. o.module)
  local target = scratch .. "/" .. o.module
  assert(sh("rm -rf " .. q(scratch) .. " && mkdir -p " .. q(target:match("^(.*)/"))))

  local _, listing = sh("cd " .. q(root) .. " && " .. lua .. " /usr/bin/busted --cpath=" .. q(cpath) .. " --list " .. o.spec)
  local specs, failed_once = {}, {}
  for name in listing:gmatch("[^\n]*:%d+: ([^\n]+)") do specs[#specs + 1] = name end

  local status = 0
  for i, m in ipairs(o.mutations) do
    if next(wanted) == nil or wanted[i] then
      local text = mutate(source, m)
      local line
      if not text then
        line, status = "DOES NOT APPLY (exactly once)", 1
      elseif not (loadstring or load)(text) then
        line, status = "DOES NOT COMPILE", 1
      else
        H.write_file(target, text)
        local _, out, code = sh(busted(m.only and ("--filter=" .. q(m.only)) or nil))
        local failing = {}
        for name in ("\n" .. out):gmatch("\nnot ok %d+ %- ([^\n]+)") do failing[#failing + 1] = name end
        if code == 124 and m.only then
          -- ran out of time: the specs it runs failed
          for _, name in ipairs(specs) do
            if name:find(m.only, 1, true) then failing[#failing + 1] = name .. " (timed out)"; failed_once[name] = true end
          end
        end
        for _, name in ipairs(failing) do failed_once[name] = true end
        if #failing == 0 then
          line, status = "BROKE NO SPEC", 1
        else
          local names = table.concat(failing, " | ")
          if o.strip then names = names:gsub(o.strip, "") end
          line = #failing .. " failing: " .. names:sub(1, 150)
        end
      end
      print(("%3d %-" .. width .. "s %s"):format(i, m[1], line))
      io.stdout:flush()
    end
  end
  sh("rm -rf " .. q(scratch))

  if next(wanted) == nil and never_failed(specs, failed_once, #o.mutations) then status = 1 end
  return status
end

-- M.run_tree{ mutations = { { "what it breaks", "file", "text", "replacement" [, ...] }, ... },
--   specs = { "tests/x_spec.lua", ... }, scratch = "slm-mutate-x" }
-- For mutations of the C core too (mutate_json.lua, mutate_csv.lua): each
-- one is applied to a copy of the tree (bin, csrc, lua, tests) under $TMPDIR,
-- which is built (build/) and whose specs run there; the report and the
-- exit status are run's.
function M.run_tree(o, argv)
  local wanted = {}
  for _, a in ipairs(argv or {}) do wanted[tonumber(a)] = true end
  local tree = (os.getenv("TMPDIR") or "/tmp") .. "/" .. o.scratch .. "/tree"
  local specs = table.concat(o.specs, " ")
  local busted = "lua5.4 /usr/bin/busted --cpath=build/?.so "
  local width = 0
  for _, m in ipairs(o.mutations) do width = math.max(width, #m[1]) end

  local ok, listing = sh("cd " .. q(root) .. " && " .. busted .. "--list " .. specs)
  assert(ok, listing)
  local all, failed_once = {}, {}
  for name in listing:gmatch("[^\n]*:%d+: ([^\n]+)") do all[#all + 1] = name end

  local status = 0
  for i, m in ipairs(o.mutations) do
    if next(wanted) == nil or wanted[i] then
      assert(sh("rm -rf " .. q(tree) .. " && mkdir -p " .. q(tree) .. " && cd " .. q(root)
        .. " && cp -r bin csrc lua tests CMakeLists.txt .busted " .. q(tree)))
      local path = tree .. "/" .. m[2]
      local text = mutate(H.read_file(path), { m[1], table.unpack(m, 3) })
      local line
      if not text then
        line, status = "DOES NOT APPLY (exactly once)", 1
      else
        H.write_file(path, text)
        local built, bout = sh("cd " .. q(tree) .. " && cmake -S . -B build -DCMAKE_INSTALL_PREFIX=/usr >/dev/null"
          .. " && cmake --build build -j2 >/dev/null")
        if not built then
          line, status = "BUILD FAILED " .. bout:sub(-300), 1
        else
          local _, out = sh("cd " .. q(tree) .. " && " .. busted .. "-o TAP " .. specs)
          local failing = {}
          for name in ("\n" .. out):gmatch("\nnot ok %d+ %- ([^\n]+)") do
            failing[#failing + 1] = name
            failed_once[name] = true
          end
          if #failing == 0 then
            line, status = "BROKE NO SPEC", 1
          else
            line = #failing .. " failing: " .. table.concat(failing, " | "):sub(1, 150)
          end
        end
      end
      print(("%3d %-" .. width .. "s %s"):format(i, m[1], line))
      io.stdout:flush()
    end
  end
  sh("rm -rf " .. q(tree))

  if next(wanted) == nil and never_failed(all, failed_once, #o.mutations) then status = 1 end
  return status
end

return M
