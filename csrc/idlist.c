/*
 * idlist.c - lists of token ids as Lua sees them, in two forms:
 *
 *   - a plain table of integers, built through the public C API
 *     (lua_createtable + lua_pushinteger + lua_rawseti, as lua-cjson builds
 *     its arrays): what tok:encode(s) returns;
 *   - "slm.IdList", a userdata holding the ids as a uint32 array: what
 *     tok:encode(s, { packed = true }) returns.  One allocation and one
 *     memcpy, however long the list.  #ids, ids[i] (1-based; nil outside
 *     1..#ids and for keys that are not integers), ids:ipairs() (and plain
 *     ipairs(ids) in Lua 5.4, through __index), ids:totable(), ids:bytes()
 *     (4 bytes per id, little-endian whatever the host), tostring, ==.
 *
 * Owns: slm_push_idtable, slm_push_idlist, slm_to_idlist (what bpe.c's
 * encode and decode use) and core.idlist_from_bytes.  Nothing here reads
 * or writes the interpreter's own structures: the list's memory is the
 * userdata's, so the GC frees it and knows its size.
 */
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include "slm.h"

#define IDLIST_MT "slm.IdList"

typedef struct {
  size_t n;
  uint32_t id[]; /* n ids */
} idlist_t;

/* The largest list: what a Lua table can index, and what fits in memory. */
#define IDLIST_MAX ((size_t)INT_MAX < (SIZE_MAX - sizeof(idlist_t)) / 4 \
                    ? (size_t)INT_MAX : (SIZE_MAX - sizeof(idlist_t)) / 4)

void slm_push_idtable(lua_State *L, const uint32_t *v, size_t n) {
  size_t i;
  int t;
  if (n > IDLIST_MAX) luaL_error(L, "too many token ids for one table (%d)", INT_MAX);
  /* exactly n array slots, so the loop below never makes the table grow */
  lua_createtable(L, (int)n, 0);
  t = lua_gettop(L);
  for (i = 0; i < n; i++) {
    lua_pushinteger(L, (lua_Integer)v[i]);
    slm_rawseti(L, t, i + 1);
  }
}

/* Push a new list of n ids; the caller fills them in. */
static idlist_t *new_idlist(lua_State *L, size_t n) {
  idlist_t *l;
  if (n > IDLIST_MAX) luaL_error(L, "too many token ids for one slm.IdList (%d)", INT_MAX);
  l = (idlist_t *)slm_newuserdata(L, sizeof(idlist_t) + n * sizeof(uint32_t));
  l->n = n;
  luaL_setmetatable(L, IDLIST_MT);
  return l;
}

void slm_push_idlist(lua_State *L, const uint32_t *v, size_t n) {
  idlist_t *l = new_idlist(L, n);
  if (n) memcpy(l->id, v, n * sizeof *v);
}

const uint32_t *slm_to_idlist(lua_State *L, int i, size_t *n) {
  const idlist_t *l = (const idlist_t *)luaL_testudata(L, i, IDLIST_MT);
  if (!l) return NULL;
  *n = l->n;
  return l->id;
}

static idlist_t *check_idlist(lua_State *L, int i) {
  return (idlist_t *)luaL_checkudata(L, i, IDLIST_MT);
}

/* Is the value at i a number with an integer value?  Then *k is it.
 * (Lua 5.4: 3 and 3.0 both; strings are never indices here.) */
static int integer_key(lua_State *L, int i, lua_Integer *k) {
#if LUA_VERSION_NUM >= 503
  int isnum = 0;
  if (lua_type(L, i) != LUA_TNUMBER) return 0;
  *k = lua_tointegerx(L, i, &isnum);
  return isnum;
#else
  lua_Number x;
  if (lua_type(L, i) != LUA_TNUMBER) return 0;
  x = lua_tonumber(L, i);
  if (!(x >= -9007199254740992.0 && x <= 9007199254740992.0)) return 0; /* 2^53; NaN */
  *k = (lua_Integer)x;
  return (lua_Number)*k == x;
#endif
}

/* Byte order on the wire: little-endian, whatever the host's. */
static void put_le32(unsigned char *p, uint32_t v) {
  p[0] = (unsigned char)v;
  p[1] = (unsigned char)(v >> 8);
  p[2] = (unsigned char)(v >> 16);
  p[3] = (unsigned char)(v >> 24);
}

static uint32_t get_le32(const unsigned char *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* __index(ids, k): ids[k] for an integer k in 1..#ids, a method for a
 * method's name, nil otherwise.  Upvalue 1: the methods table. */
static int l_index(lua_State *L) {
  const idlist_t *l = check_idlist(L, 1);
  lua_Integer k;
  if (integer_key(L, 2, &k)) {
    if (k >= 1 && (uint64_t)k <= l->n) lua_pushinteger(L, (lua_Integer)l->id[k - 1]);
    else lua_pushnil(L);
    return 1;
  }
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  return 1;
}

static int l_len(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)check_idlist(L, 1)->n);
  return 1;
}

/* The iterator of ids:ipairs(): (_, i) -> i + 1, ids[i + 1], or nil.
 * Upvalue 1: the list (checked by l_ipairs, not at every step). */
static int l_next(lua_State *L) {
  const idlist_t *l = (const idlist_t *)lua_touserdata(L, lua_upvalueindex(1));
  lua_Integer i = luaL_checkinteger(L, 2);
  if (i < 0 || (uint64_t)i >= l->n) {
    lua_pushnil(L);
    return 1;
  }
  lua_pushinteger(L, i + 1);
  lua_pushinteger(L, (lua_Integer)l->id[i]);
  return 2;
}

/* ids:ipairs() -> iterator, ids, 0: for i, id in ids:ipairs() do ... end
 * (LuaJIT's ipairs takes tables only). */
static int l_ipairs(lua_State *L) {
  check_idlist(L, 1);
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, l_next, 1);
  lua_pushvalue(L, 1);
  lua_pushinteger(L, 0);
  return 3;
}

/* ids:totable() -> { ids } */
static int l_totable(lua_State *L) {
  const idlist_t *l = check_idlist(L, 1);
  slm_push_idtable(L, l->id, l->n);
  return 1;
}

/* ids:bytes() -> string of #ids * 4 bytes, id k at bytes 4k-3..4k,
 * least significant byte first. */
static int l_bytes(lua_State *L) {
  const idlist_t *l = check_idlist(L, 1);
  luaL_Buffer b;
  size_t i = 0;
  luaL_buffinit(L, &b);
  while (i < l->n) {
    unsigned char *p = (unsigned char *)luaL_prepbuffer(&b);
    size_t k, m = LUAL_BUFFERSIZE / 4;
    if (m > l->n - i) m = l->n - i;
    for (k = 0; k < m; k++) put_le32(p + 4 * k, l->id[i + k]);
    luaL_addsize(&b, m * 4);
    i += m;
  }
  luaL_pushresult(&b);
  return 1;
}

/* core.idlist_from_bytes(s) -> slm.IdList, the inverse of ids:bytes() */
static int l_from_bytes(lua_State *L) {
  size_t len, i;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &len);
  idlist_t *l;
  if (len % 4 != 0)
    return luaL_argerror(L, 1, lua_pushfstring(L,
      "length %d is not a multiple of 4: 4 little-endian bytes per id",
      (int)(len > INT_MAX ? INT_MAX : len)));
  l = new_idlist(L, len / 4);
  for (i = 0; i < l->n; i++) l->id[i] = get_le32(s + 4 * i);
  return 1;
}

/* ids == other: the same ids in the same order */
static int l_eq(lua_State *L) {
  const idlist_t *a = check_idlist(L, 1);
  const idlist_t *b = (const idlist_t *)luaL_testudata(L, 2, IDLIST_MT);
  lua_pushboolean(L, b && a->n == b->n && (a->n == 0 || memcmp(a->id, b->id, a->n * sizeof a->id[0]) == 0));
  return 1;
}

/* "slm.IdList(5: 9906 1917 ...)": the length and the first few ids */
#define SHOW 8
static int l_tostring(lua_State *L) {
  const idlist_t *l = check_idlist(L, 1);
  char buf[64 + SHOW * 12];
  size_t i, at;
  at = (size_t)snprintf(buf, sizeof buf, "slm.IdList(%lu%s", (unsigned long)l->n, l->n ? ":" : "");
  for (i = 0; i < l->n && i < SHOW; i++)
    at += (size_t)snprintf(buf + at, sizeof buf - at, " %lu", (unsigned long)l->id[i]);
  snprintf(buf + at, sizeof buf - at, "%s)", l->n > SHOW ? " ..." : "");
  lua_pushstring(L, buf);
  return 1;
}

int slm_open_idlist(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"ipairs", l_ipairs}, {"totable", l_totable}, {"bytes", l_bytes}, {NULL, NULL}
  };
  static const luaL_Reg meta[] = {
    {"__len", l_len}, {"__eq", l_eq}, {"__tostring", l_tostring}, {NULL, NULL}
  };
  if (luaL_newmetatable(L, IDLIST_MT)) {
    luaL_setfuncs(L, meta, 0);
    lua_createtable(L, 0, 3);
    luaL_setfuncs(L, methods, 0);
    lua_pushcclosure(L, l_index, 1);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, l_from_bytes);
  lua_setfield(L, -2, "idlist_from_bytes");
  return 0;
}
