/*
 * clock.c - time and terminal helpers: a monotonic clock (core.now) and
 * isatty for progress bars.
 */
#define _POSIX_C_SOURCE 200809L
#include <time.h>
#include <unistd.h>
#include "slm.h"

double slm_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int l_now(lua_State *L) {
  lua_pushnumber(L, slm_now());
  return 1;
}

/* Process CPU time in seconds (user + system), for benchmarks. */
static int l_cputime(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  lua_pushnumber(L, (double)ts.tv_sec + (double)ts.tv_nsec / 1e9);
  return 1;
}

static int l_isatty(lua_State *L) {
  int fd = (int)luaL_optinteger(L, 1, 2);
  lua_pushboolean(L, isatty(fd));
  return 1;
}

int slm_open_clock(lua_State *L) {
  static const luaL_Reg fns[] = {
    {"now", l_now}, {"cputime", l_cputime}, {"isatty", l_isatty}, {NULL, NULL}
  };
  luaL_setfuncs(L, fns, 0);
  return 0;
}
