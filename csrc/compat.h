/*
 * compat.h - the only place that knows which Lua engine we build against.
 *
 * slm.core is built once per engine: Lua 5.4 (plain scripts, batch jobs) and
 * LuaJIT / Lua 5.1 API (OpenResty).  Everything else in csrc/ uses the 5.4
 * names below and stays engine-agnostic.
 */
#ifndef SLM_COMPAT_H
#define SLM_COMPAT_H

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#if LUA_VERSION_NUM < 502
/* Lua 5.1 / LuaJIT 2.1: LuaJIT already provides luaL_setfuncs, luaL_newlib,
 * luaL_testudata and luaL_setmetatable. */
#  ifndef lua_rawlen
#    define lua_rawlen(L, i) lua_objlen((L), (i))
#  endif
#  ifndef LUA_OK
#    define LUA_OK 0
#  endif
#  define slm_absindex(L, i) \
     (((i) > 0 || (i) <= LUA_REGISTRYINDEX) ? (i) : lua_gettop(L) + (i) + 1)
#  define slm_rawgeti(L, t, n) (lua_rawgeti((L), (t), (int)(n)), lua_type((L), -1))
#  define slm_rawseti(L, t, n) lua_rawseti((L), (t), (int)(n))
#  define slm_getfield(L, t, k) (lua_getfield((L), (t), (k)), lua_type((L), -1))
#  define slm_newuserdata(L, sz) lua_newuserdata((L), (sz))
#else
#  define slm_absindex(L, i) lua_absindex((L), (i))
#  if LUA_VERSION_NUM >= 503
#    define slm_rawgeti(L, t, n) lua_rawgeti((L), (t), (lua_Integer)(n))
#    define slm_getfield(L, t, k) lua_getfield((L), (t), (k))
#  else
#    define slm_rawgeti(L, t, n) (lua_rawgeti((L), (t), (int)(n)), lua_type((L), -1))
#    define slm_getfield(L, t, k) (lua_getfield((L), (t), (k)), lua_type((L), -1))
#  endif
#  define slm_rawseti(L, t, n) lua_rawseti((L), (t), (n))
#  if LUA_VERSION_NUM >= 504
#    define slm_newuserdata(L, sz) lua_newuserdatauv((L), (sz), 0)
#  else
#    define slm_newuserdata(L, sz) lua_newuserdata((L), (sz))
#  endif
#endif

#endif /* SLM_COMPAT_H */
