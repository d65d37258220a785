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
int slm_open_idlist(lua_State *L); /* idlist.c: slm.IdList, idlist_from_bytes() */
int slm_open_json(lua_State *L);   /* json.c: json_encode() */
int slm_open_base64(lua_State *L); /* base64.c: base64_encode(), base64_decode() */
int slm_open_sha256(lua_State *L); /* sha256.c: sha256() */
int slm_open_proc(lua_State *L);   /* proc.c: fsync(), trap_signals(), trapped() */
int slm_open_csv(lua_State *L);    /* csv.c: csv_parser(), csv_format() */

double slm_now(void);              /* monotonic seconds */

/* base64.c: RFC 4648 base64 (slm_base64_decode: both alphabets, whitespace
 * skipped, stops at '=' or after max bytes when max > 0; -1 on a bad
 * character; out needs n * 3 / 4 + 3 bytes) */
size_t slm_base64_encoded_len(size_t n);
void slm_base64_encode(const unsigned char *s, size_t n, char *out);
long slm_base64_decode(const unsigned char *s, size_t n, unsigned char *out, size_t max);

/* idlist.c: push v[0, n) as a new table {v[0], ..., v[n-1]} of integers
 * (slm_push_idtable) or as a new slm.IdList (slm_push_idlist); the ids of
 * the slm.IdList at stack index i and their number, or NULL when that value
 * is not one (slm_to_idlist: the pointer lives as long as the value). */
void slm_push_idtable(lua_State *L, const uint32_t *v, size_t n);
void slm_push_idlist(lua_State *L, const uint32_t *v, size_t n);
const uint32_t *slm_to_idlist(lua_State *L, int i, size_t *n);

/* Register a userdata class: metatable `name` whose __index holds
 * `methods`, with `close` as __gc and __close (one idempotent function, as
 * STYLE.md asks) and an optional __tostring. */
void slm_new_class(lua_State *L, const char *name, const luaL_Reg *methods,
                   lua_CFunction close, lua_CFunction tostring);

#endif
