/*
 * idlist.c - lists of token ids as Lua sees them: plain tables of
 * integers, built through the public C API (lua_createtable +
 * lua_pushinteger + lua_rawseti, as lua-cjson builds its arrays): what
 * tok:encode(s) returns.
 *
 * Owns: slm_push_idtable (what bpe.c's encode uses).  Nothing here reads
 * or writes the interpreter's own structures.
 */
#include <limits.h>
#include "slm.h"

void slm_push_idtable(lua_State *L, const uint32_t *v, size_t n) {
  size_t i;
  int t;
  if (n > (size_t)INT_MAX) luaL_error(L, "too many token ids for one table (%d)", INT_MAX);
  /* exactly n array slots, so the loop below never makes the table grow */
  lua_createtable(L, (int)n, 0);
  t = lua_gettop(L);
  for (i = 0; i < n; i++) {
    lua_pushinteger(L, (lua_Integer)v[i]);
    slm_rawseti(L, t, i + 1);
  }
}
