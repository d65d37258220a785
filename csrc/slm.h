/*
 * slm.h - internal declarations shared by the C files of slm.core.
 *
 * Each concept lives in its own file and registers its functions into the
 * module table through one slm_open_* function (module table on top of the
 * stack on entry and on return).
 */
#ifndef SLM_H
#define SLM_H

#include <stddef.h>
#include <stdint.h>
#include "compat.h"

#define SLM_CORE_VERSION "0.1.0"

int slm_open_clock(lua_State *L);  /* clock.c: now(), isatty() */
int slm_open_http(lua_State *L);   /* http.c: libcurl multi driver */
int slm_open_sse(lua_State *L);    /* sse.c: incremental SSE parser */
int slm_open_bpe(lua_State *L);    /* bpe.c: byte-level BPE tokenizer */
int slm_open_intlist(lua_State *L); /* intlist.c: intlist_path() */
int slm_open_json(lua_State *L);   /* json.c: json_encode() */

double slm_now(void);              /* monotonic seconds */

/* intlist.c: push {v[0], ..., v[n-1]} as a new Lua list of integers */
void slm_push_intlist(lua_State *L, const uint32_t *v, size_t n);

/* Register a userdata class: metatable `name` whose __index holds
 * `methods`, with `close` as __gc and __close (one idempotent function, as
 * STYLE.md asks) and an optional __tostring. */
void slm_new_class(lua_State *L, const char *name, const luaL_Reg *methods,
                   lua_CFunction close, lua_CFunction tostring);

#endif
