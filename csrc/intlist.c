/*
 * intlist.c - push a C array of token ids as a Lua list.
 *
 * tok:encode returns a table of 2.45M integers for 10 MB of English.  With
 * the C API that is lua_pushinteger + lua_rawseti per id: four calls deep
 * in Lua 5.4 (lua_rawseti -> index2value -> luaH_setint -> luaH_getint),
 * 13-20 ns each on our benchmark machine, as long as the whole tokenizing
 * of the text.  A plain C loop writing the same 16-byte slots takes 2 ns.
 *
 * So on Lua 5.4 the list is created with lua_createtable(L, n, 0), whose
 * array part is then exactly n slots, and the slots are written directly:
 * value and type tag, which is all lua_rawseti would store for an integer
 * (integers are not collectable: no GC barrier is due).  The layout of
 * Lua 5.4's Table and TValue is private to Lua, so it is not assumed: every
 * call first builds a small probe table with the public API and checks
 * that this file's view of it (array pointer, size, tags, values) matches
 * what the API stored.  If anything differs - another Lua 5.4.x with a
 * different layout, an engine built with other options - the API loop is
 * used.  Lua 5.1/LuaJIT and 5.3 always take the API loop.
 *
 * SLM_INTLIST=api in the environment forces the API loop (the specs run
 * both paths and compare them).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "slm.h"

#define PROBE_N 3
#define FAST_MIN 64 /* below this the API loop costs less than the probe */

static void push_api(lua_State *L, const uint32_t *v, size_t n) {
  size_t i;
  lua_createtable(L, n > INT32_MAX ? INT32_MAX : (int)n, 0);
  for (i = 0; i < n; i++) {
    lua_pushinteger(L, (lua_Integer)v[i]);
    slm_rawseti(L, -2, i + 1);
  }
}

#if LUA_VERSION_NUM == 504
/* Lua 5.4's lobject.h, as this file expects it (5.4.0 through 5.4.7):
 *   TValue { Value value_; lu_byte tt_; }             integer tag 3
 *   Table  { GCObject *next; lu_byte tt, marked, flags, lsizenode;
 *            unsigned int alimit; TValue *array; ... }            */
typedef struct {
  union { void *p; lua_Integer i; lua_Number n; } value_;
  unsigned char tt_;
} view_tvalue;

typedef struct {
  void *next;
  unsigned char tt, marked, flags, lsizenode;
  unsigned int alimit;
  view_tvalue *array;
} view_table;

#define VIEW_VNUMINT 3 /* makevariant(LUA_TNUMBER, 0) */

static int env_forces_api(void) {
  const char *e = getenv("SLM_INTLIST");
  return e && strcmp(e, "api") == 0;
}

/* The table on top of the stack, seen through view_table, if it is a list
 * of exactly `n` array slots; NULL otherwise. */
static view_table *view_of(lua_State *L, size_t n) {
  view_table *t = (view_table *)(uintptr_t)lua_topointer(L, -1);
  if (!t || t->alimit != n || !t->array) return NULL;
  return t;
}

/* Does this file's view of a table agree with what the API stores? */
static int layout_matches(lua_State *L) {
  static const lua_Integer probe[PROBE_N] = { 0x5a17, -2, LUA_MAXINTEGER - 6 };
  view_table *t;
  int i, ok = 1;
  lua_createtable(L, PROBE_N, 0);
  for (i = 0; i < PROBE_N; i++) {
    lua_pushinteger(L, probe[i]);
    lua_rawseti(L, -2, i + 1);
  }
  t = view_of(L, PROBE_N);
  if (!t) ok = 0;
  for (i = 0; ok && i < PROBE_N; i++)
    ok = t->array[i].tt_ == VIEW_VNUMINT && t->array[i].value_.i == probe[i];
  lua_pop(L, 1);
  return ok;
}
#endif

/* Would a long list be written directly (1) or through the API (0)? */
static int direct_ok(lua_State *L) {
#if LUA_VERSION_NUM == 504
  return lua_version(L) == 504 && !env_forces_api() && layout_matches(L);
#else
  (void)L;
  return 0;
#endif
}

void slm_push_intlist(lua_State *L, const uint32_t *v, size_t n) {
#if LUA_VERSION_NUM == 504
  if (n >= FAST_MIN && n <= (size_t)INT32_MAX && direct_ok(L)) {
    view_table *t;
    size_t i;
    lua_createtable(L, (int)n, 0);
    t = view_of(L, n);
    if (t) {
      view_tvalue *a = t->array;
      for (i = 0; i < n; i++) {
        a[i].value_.i = (lua_Integer)v[i];
        a[i].tt_ = VIEW_VNUMINT;
      }
      return;
    }
    lua_pop(L, 1);
  }
#endif
  push_api(L, v, n);
}

/* core.intlist_path() -> "direct" | "api": how tok:encode builds long
 * lists in this Lua (the specs check it, so a silent fallback shows). */
static int l_intlist_path(lua_State *L) {
  if (direct_ok(L))
    lua_pushliteral(L, "direct");
  else
    lua_pushliteral(L, "api");
  return 1;
}

int slm_open_intlist(lua_State *L) {
  lua_pushcfunction(L, l_intlist_path);
  lua_setfield(L, -2, "intlist_path");
  return 0;
}
