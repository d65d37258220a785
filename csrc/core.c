/*
 * core.c - entry point of the slm.core module: builds the module table and
 * lets each concept (clock, http, sse, bpe, idlist, json, base64, sha256,
 * csv, proc) register itself.
 */
#include "slm.h"

#if defined(_WIN32)
#  define SLM_EXPORT __declspec(dllexport)
#else
#  define SLM_EXPORT __attribute__((visibility("default")))
#endif

SLM_EXPORT int luaopen_slm_core(lua_State *L);
SLM_EXPORT int luaopen_slm_core(lua_State *L) {
  lua_newtable(L);
  lua_pushliteral(L, SLM_CORE_VERSION);
  lua_setfield(L, -2, "version");
  slm_open_clock(L);
  slm_open_http(L);
  slm_open_sse(L);
  slm_open_bpe(L);
  slm_open_idlist(L);
  slm_open_json(L);
  slm_open_base64(L);
  slm_open_sha256(L);
  slm_open_proc(L);
  slm_open_csv(L);
  return 1;
}
