rockspec_format = "3.0"
package = "lua-slm"
version = "0.1.0-1"
-- Built from a checkout, for Lua 5.4 (Debian's luarocks defaults to 5.1):
--   luarocks --lua-version 5.4 make rockspec/lua-slm-0.1.0-1.rockspec
-- On Debian, where lua-cjson comes from apt (bin/setup-deps installs it),
-- luarocks cannot see it as a rock and would try to fetch and build another
-- one: add --deps-mode=none there, i.e.
--   sudo luarocks --lua-version 5.4 make --deps-mode=none rockspec/lua-slm-0.1.0-1.rockspec
-- That installs slm into luarocks' tree (/usr/local as root) and `slm` into its bin/.
source = {
  url = "git+file:///dev/null",
}
description = {
  summary = "Small language models at work in Lua: an OpenAI-compatible client with a C core",
  detailed = [[
    lua-slm puts small, cheap chat models (gpt-4o-mini, Hermes 3 and anything behind an
    OpenAI-compatible chat-completions endpoint) to work from Lua 5.4 scripts, batch jobs
    and OpenResty: non-blocking HTTP over the libcurl multi interface, an SSE stream parser
    and an exact BPE tokenizer in C; retries, fallback, budgets, rate limits and cost in Lua.
  ]],
  license = "MIT",
  labels = { "llm", "openai", "http", "sse", "tokenizer" },
}
dependencies = {
  "lua >= 5.1",
  "lua-cjson",
  "argparse >= 0.7", -- the `slm` command (Debian: lua-argparse)
}
-- libcurl (libcurl4-openssl-dev on Debian) is found by CMake through pkg-config.
build = {
  type = "cmake",
  variables = {
    CMAKE_BUILD_TYPE = "Release",
    CMAKE_INSTALL_PREFIX = "$(PREFIX)",
    SLM_CMOD_DIR = "$(LIBDIR)",
    SLM_LMOD_DIR = "$(LUADIR)",
    SLM_WERROR = "OFF",
  },
}
