/*
 * proc.c - process helpers for the batch runner: fsync of a Lua file
 * handle (its ledger survives a crash of the machine, not only of the
 * process) and a trap for SIGINT/SIGTERM that only records the signal, so
 * that the runner stops sending, lets its in-flight rows finish and
 * flushes before it exits.  A second trapped signal ends the process at
 * once (the ledger is safe at any instant).  And a file's identity
 * (device and inode), so that the runner never writes over an input that
 * it was given by another path.  And a file's type, and the head of a
 * regular file, read without ever opening anything else: a FIFO with no
 * writer would block open(2) for ever and a device can be endless.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
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

/* stat(2) of the path argument 1: 0, or the count of nil, message pushed
 * (a path with a NUL byte raises). */
static int stat_arg(lua_State *L, struct stat *st) {
  size_t len;
  const char *path = luaL_checklstring(L, 1, &len);
  if (strlen(path) != len) return luaL_argerror(L, 1, "a path with a NUL byte");
  if (stat(path, st) == 0) return 0;
  lua_pushnil(L);
  lua_pushstring(L, strerror(errno));
  return 2;
}

/* core.file_id(path) -> "device:inode" | nil, message: the identity of
 * the file at path, symlinks followed (stat(2)); two paths naming one file
 * (./in.csv and in.csv, a symlink, a hard link) give the same string. */
static int l_file_id(lua_State *L) {
  struct stat st;
  int failed = stat_arg(L, &st);
  if (failed) return failed;
  char id[48]; /* lua_pushfstring has no 64-bit format in Lua 5.1 */
  snprintf(id, sizeof id, "%llu:%llu", (unsigned long long)st.st_dev, (unsigned long long)st.st_ino);
  lua_pushstring(L, id);
  return 1;
}

/* The name of a file type (st_mode) for Lua. */
static const char *kind_of(mode_t m) {
  if (S_ISREG(m)) return "file";
  if (S_ISDIR(m)) return "directory";
  if (S_ISFIFO(m)) return "fifo";
  if (S_ISSOCK(m)) return "socket";
  if (S_ISCHR(m)) return "character device";
  if (S_ISBLK(m)) return "block device";
  return "special file";
}

/* core.file_type(path) -> kind, size | nil, message: what stat(2) says
 * the path is (symlinks followed), without opening it: "file" (a regular
 * file, size its bytes), "directory", "fifo", "socket", "character
 * device", "block device" or "special file". */
static int l_file_type(lua_State *L) {
  struct stat st;
  int failed = stat_arg(L, &st);
  if (failed) return failed;
  lua_pushstring(L, kind_of(st.st_mode));
  lua_pushinteger(L, (lua_Integer)st.st_size);
  return 2;
}

/* core.read_head(path, max) -> bytes | nil, message, kind: the first max
 * bytes (at most) of a regular file.  Anything else is refused without
 * being opened (stat(2) first), and a path swapped for something else
 * between the stat and the open is refused too: it is opened with
 * O_NONBLOCK (a FIFO's open cannot block) and checked again with fstat(2)
 * before a byte is read.  kind, on a refusal: the file_type kind, or nil
 * when the path could not be read at all. */
static int l_read_head(lua_State *L) {
  size_t len, want, got = 0;
  const char *path = luaL_checklstring(L, 1, &len);
  lua_Number maxn = luaL_checknumber(L, 2);
  struct stat st;
  char *buf = NULL;
  int fd = -1, e;
  if (strlen(path) != len) return luaL_argerror(L, 1, "a path with a NUL byte");
  if (!(maxn >= 0) || maxn > 1073741824.0) return luaL_argerror(L, 2, "max must be a number in [0, 2^30]");
  if (stat(path, &st) != 0) goto fail;
  if (!S_ISREG(st.st_mode)) goto refuse;
  want = (size_t)maxn;
  if (st.st_size >= 0 && (unsigned long long)st.st_size < (unsigned long long)want) want = (size_t)st.st_size;
  /* the buffer before the descriptor: an allocation error leaks nothing */
  if (want > 0) buf = (char *)slm_newuserdata(L, want);
  fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
  if (fd < 0 || fstat(fd, &st) != 0) goto fail;
  if (!S_ISREG(st.st_mode)) goto refuse;
  while (got < want) {
    ssize_t r = read(fd, buf + got, want - got);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) goto fail;
    if (r == 0) break;
    got += (size_t)r;
  }
  close(fd);
  lua_pushlstring(L, got > 0 ? buf : "", got);
  return 1;
fail:
  e = errno;
  if (fd >= 0) close(fd);
  lua_pushnil(L);
  lua_pushstring(L, strerror(e));
  return 2;
refuse:
  if (fd >= 0) close(fd);
  lua_pushnil(L);
  lua_pushfstring(L, "a %s, not a regular file", kind_of(st.st_mode));
  lua_pushstring(L, kind_of(st.st_mode));
  return 3;
}

int slm_open_proc(lua_State *L) {
  static const luaL_Reg fns[] = {
    {"fsync", l_fsync}, {"trap_signals", l_trap}, {"trapped", l_trapped},
    {"file_id", l_file_id}, {"file_type", l_file_type}, {"read_head", l_read_head}, {NULL, NULL}
  };
  luaL_setfuncs(L, fns, 0);
  return 0;
}
