/*
 * proc.c - process helpers for the batch runner: fsync of a Lua file
 * handle (its ledger survives a crash of the machine, not only of the
 * process) and a trap for SIGINT/SIGTERM that only records the signal, so
 * that the runner stops sending, lets its in-flight rows finish and
 * flushes before it exits.  A second trapped signal ends the process at
 * once (the ledger is safe at any instant).
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include "slm.h"

static volatile sig_atomic_t trapped = 0;

static void on_signal(int sig) {
  if (trapped) {
    signal(sig, SIG_DFL);
    raise(sig);
    return;
  }
  trapped = sig;
}

/* core.fsync(file) -> true | nil, message: flush the Lua file's buffer,
 * then fsync its descriptor. Lua 5.2+ only: luaL_Stream (lauxlib.h) is the
 * public layout of a file handle there; before it (LuaJIT, where the
 * batch CLI does not run) a handle's layout is the interpreter's own, so
 * the call answers nil and says so instead of reading it. */
static int l_fsync(lua_State *L) {
#if LUA_VERSION_NUM >= 502
  luaL_Stream *p = (luaL_Stream *)luaL_checkudata(L, 1, LUA_FILEHANDLE);
  if (p->closef == NULL || p->f == NULL) return luaL_error(L, "core.fsync: the file is closed");
  if (fflush(p->f) != 0 || fsync(fileno(p->f)) != 0) {
    lua_pushnil(L);
    lua_pushstring(L, strerror(errno));
    return 2;
  }
#else
  luaL_checkudata(L, 1, "FILE*");
  lua_pushnil(L);
  lua_pushliteral(L, "core.fsync needs Lua 5.2 or later (flush the file from Lua)");
  return 2;
#endif
  lua_pushboolean(L, 1);
  return 1;
}

/* core.trap_signals(): SIGINT and SIGTERM are recorded, not fatal. */
static int l_trap(lua_State *L) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  if (sigaction(SIGINT, &sa, NULL) != 0 || sigaction(SIGTERM, &sa, NULL) != 0)
    return luaL_error(L, "core.trap_signals: %s", strerror(errno));
  trapped = 0;
  lua_pushboolean(L, 1);
  return 1;
}

/* core.trapped() -> "INT" | "TERM" | nil: the first trapped signal. */
static int l_trapped(lua_State *L) {
  int sig = trapped;
  if (sig == SIGINT) lua_pushliteral(L, "INT");
  else if (sig == SIGTERM) lua_pushliteral(L, "TERM");
  else lua_pushnil(L);
  return 1;
}

int slm_open_proc(lua_State *L) {
  static const luaL_Reg fns[] = {
    {"fsync", l_fsync}, {"trap_signals", l_trap}, {"trapped", l_trapped}, {NULL, NULL}
  };
  luaL_setfuncs(L, fns, 0);
  return 0;
}
