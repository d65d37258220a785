/*
 * base64.c - RFC 4648 base64, one implementation for the whole core: the
 * tokenizer reads tiktoken vocabularies with it (bpe.c), images become
 * data: URLs with it (core.base64_encode), image headers are read from
 * data: URLs with it (core.base64_decode).
 *
 * Lua API (module slm.core):
 *   core.base64_encode(s) -> string   (standard alphabet, padded)
 *   core.base64_decode(s [, max]) -> string | nil, message
 *       standard and URL alphabets, whitespace ignored, padding optional;
 *       with max, only (at least) the first max bytes are decoded: enough
 *       to read an image header without decoding the whole image.
 */
#include <math.h>
#include <string.h>
#include "slm.h"

static const char ALPHA[64] =
  "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* value + 1 for each character of either alphabet; 0: not base64 */
static signed char VAL[256];
static int val_ready;

static void val_init(void) {
  int i;
  if (val_ready) return;
  for (i = 0; i < 64; i++) VAL[(unsigned char)ALPHA[i]] = (signed char)(i + 1);
  VAL['-'] = 63; /* base64url */
  VAL['_'] = 64;
  val_ready = 1;
}

size_t slm_base64_encoded_len(size_t n) { return (n + 2) / 3 * 4; }

void slm_base64_encode(const unsigned char *s, size_t n, char *out) {
  size_t i = 0, o = 0;
  for (; i + 3 <= n; i += 3) {
    unsigned v = (unsigned)s[i] << 16 | (unsigned)s[i + 1] << 8 | s[i + 2];
    out[o++] = ALPHA[v >> 18];
    out[o++] = ALPHA[(v >> 12) & 63];
    out[o++] = ALPHA[(v >> 6) & 63];
    out[o++] = ALPHA[v & 63];
  }
  if (i < n) {
    unsigned v = (unsigned)s[i] << 16 | (i + 1 < n ? (unsigned)s[i + 1] << 8 : 0);
    out[o++] = ALPHA[v >> 18];
    out[o++] = ALPHA[(v >> 12) & 63];
    out[o++] = i + 1 < n ? ALPHA[(v >> 6) & 63] : '=';
    out[o++] = '=';
  }
}

/* Decode s[0,n) into out (room for n * 3 / 4 + 3 bytes), skipping ASCII
 * whitespace and stopping at the first '=' or after `max` output bytes
 * (0: no limit).  Returns the bytes written, or -1 on a character outside
 * both alphabets, or a lone character at the end. */
long slm_base64_decode(const unsigned char *s, size_t n, unsigned char *out, size_t max) {
  size_t i, o = 0;
  unsigned acc = 0;
  int k = 0;
  val_init();
  for (i = 0; i < n; i++) {
    unsigned c = s[i];
    int v;
    if (c == ' ' || c == '\n' || c == '\r' || c == '\t') continue;
    if (c == '=') break;
    v = VAL[c];
    if (!v) return -1;
    acc = acc << 6 | (unsigned)(v - 1);
    if (++k == 4) {
      out[o++] = (unsigned char)(acc >> 16);
      out[o++] = (unsigned char)(acc >> 8);
      out[o++] = (unsigned char)acc;
      acc = 0;
      k = 0;
      if (max && o >= max) return (long)o;
    }
  }
  if (k == 1) return -1;
  if (k == 2) out[o++] = (unsigned char)(acc >> 4);
  if (k == 3) {
    out[o++] = (unsigned char)(acc >> 10);
    out[o++] = (unsigned char)(acc >> 2);
  }
  return (long)o;
}

/* Scratch memory owned by Lua (a userdata on the stack), so that nothing
 * leaks when pushing the result raises; LuaJIT has no luaL_buffinitsize. */
static int l_encode(lua_State *L) {
  size_t n, len;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
  char *out;
  len = slm_base64_encoded_len(n);
  out = (char *)slm_newuserdata(L, len ? len : 1);
  slm_base64_encode(s, n, out);
  lua_pushlstring(L, out, len);
  return 1;
}

static int l_decode(lua_State *L) {
  size_t n;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
  lua_Number max = luaL_optnumber(L, 2, 0);
  size_t lim, room = n / 4 * 3 + 3;
  unsigned char *out;
  long got;
  /* the range first: converting a number beyond size_t is undefined */
  luaL_argcheck(L, max >= 0 && max < 9007199254740992.0 && max == floor(max), 2,
                "max must be a non-negative integer");
  lim = (size_t)max;
  /* with max, decoding stops after the group that reaches it: at most
   * max + 2 bytes, whatever the length of s */
  if (lim && lim < room - 3) room = lim + 3;
  out = (unsigned char *)slm_newuserdata(L, room);
  got = slm_base64_decode(s, n, out, lim);
  if (got < 0) {
    lua_pushnil(L);
    lua_pushliteral(L, "invalid base64");
    return 2;
  }
  lua_pushlstring(L, (const char *)out, (size_t)got);
  return 1;
}

int slm_open_base64(lua_State *L) {
  val_init();
  lua_pushcfunction(L, l_encode);
  lua_setfield(L, -2, "base64_encode");
  lua_pushcfunction(L, l_decode);
  lua_setfield(L, -2, "base64_decode");
  return 0;
}
