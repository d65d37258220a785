/*
 * proc.c - process helpers for the batch runner: fsync of a Lua file
 * handle (its ledger survives a crash of the machine, not only of the
 * process) and a trap for SIGINT/SIGTERM that only records the signal, so
 * that the runner stops sending, lets its in-flight rows finish and
 * flushes before it exits.  A second trapped signal ends the process at
 * once (the ledger is safe at any instant).  And a file's identity
 * (device and inode), so that the runner never writes over an input that
 * it was given by another path.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
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

/* core.file_id(path) -> "device:inode" | nil, message: the identity of
 * the file at path, symlinks followed (stat(2)); two paths naming one file
 * (./in.csv and in.csv, a symlink, a hard link) give the same string. */
static int l_file_id(lua_State *L) {
  size_t len;
  const char *path = luaL_checklstring(L, 1, &len);
  struct stat st;
  if (strlen(path) != len) return luaL_argerror(L, 1, "a path with a NUL byte");
  if (stat(path, &st) != 0) {
    lua_pushnil(L);
    lua_pushstring(L, strerror(errno));
    return 2;
  }
  char id[48]; /* lua_pushfstring has no 64-bit format in Lua 5.1 */
  snprintf(id, sizeof id, "%llu:%llu", (unsigned long long)st.st_dev, (unsigned long long)st.st_ino);
  lua_pushstring(L, id);
  return 1;
}

int slm_open_proc(lua_State *L) {
  static const luaL_Reg fns[] = {
    {"fsync", l_fsync}, {"trap_signals", l_trap}, {"trapped", l_trapped},
    {"file_id", l_file_id}, {NULL, NULL}
  };
  luaL_setfuncs(L, fns, 0);
  return 0;
}
