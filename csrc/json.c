/*
 * json.c - JSON text out: core.json_encode(value [, opts]) -> string.
 *
 * lua-cjson keeps decoding; this file owns encoding, because request bodies
 * need what cjson 2.1.0 cannot give: integers sent exactly (seeds, ids),
 * an empty array (`tools = {}` must be able to go out as []), and object
 * keys in one canonical order (CLI output, a response cache).
 *
 * Rules (README "Other helpers" is the user-facing copy):
 *  - nil, slm.json.null (any NULL light userdata) -> null; booleans.
 *  - Lua 5.3+ integers print as integers over the whole 64-bit range.
 *    Floats: NaN and infinities raise; an integral float in [-2^63, 2^63)
 *    prints as that integer ("1", "9007199254740991"; -0.0 as "-0");
 *    any other float as the first of %.15g, %.16g, %.17g that reads back
 *    equal (so 0.25 -> 0.25, 0.1 + 0.2 -> 0.30000000000000004,
 *    1e300 -> 1e+300), with '.' whatever the locale.
 *  - Strings: `"`, `\` and the control characters U+0000..U+001F are
 *    escaped (\b \f \n \r \t, else \u00XX); `/` and DEL are not.  Bytes of
 *    0x80 and above must form UTF-8 as RFC 3629 defines it (no overlong
 *    forms, no surrogates U+D800..DFFF, nothing above U+10FFFF) and are
 *    copied unchanged; anything else raises, naming the byte.
 *  - Tables, read raw (no __index, __pairs or __len): keys exactly 1..n
 *    (n >= 1) -> array; string keys only -> object, keys sorted by bytes;
 *    empty -> {}.  A metatable field __jsontype = "array" / "object" forces
 *    the kind (an empty array is []), and so do the metatables passed as
 *    opts.array_mt (array) and opts.empty_array_mt ([] when empty, else the
 *    usual rules), which is how slm.json honours lua-cjson forks that have
 *    cjson.array_mt / cjson.empty_array_mt; opts.empty_array is a light
 *    userdata that encodes as [] (cjson.empty_array in those forks).
 *  - Raises (luaL_error, "slm.json: ... at $.path"): functions, userdata,
 *    threads, other light userdata, mixed integer and string keys, sparse
 *    arrays, keys that are neither strings nor integers, cycles, nesting
 *    deeper than 64, invalid UTF-8, a bad __jsontype.  Paths use Lua's
 *    1-based indices: $.tools[1].parameters.
 *
 * Memory: the output buffer and the key-sorting scratch belong to an
 * encoder userdata (its __gc frees them), allocated with the state's
 * allocator and kept between calls (released after a call that grew them
 * past KEEP_MAX), so nothing leaks when an error is raised half-way.  The
 * work runs under lua_pcall so the encoder is marked free again whatever
 * happens; a call that finds it busy (json_encode from a __gc finalizer
 * running inside an allocation of ours) gets a fresh one.
 *
 * Only the public Lua C API is used; the same code builds for LuaJIT, where
 * every number is a double (see README: integers beyond 2^53 cannot all be
 * held there in the first place).
 */
#include <locale.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "slm.h"

#define ENC_MT "slm.json.Encoder"
#define MAX_DEPTH 64
#define KEEP_MAX ((size_t)1 << 20)
#define KEY_SHOWN 40 /* bytes of a key shown in an error path */
#define STACK_PAIRS 32 /* pairs of one object kept on the Lua stack */

/* stack slots of json_run (see l_json_encode) */
#define S_ENC 1
#define S_VALUE 2
#define S_EMPTY_ARRAY 3
#define S_ARRAY_MT 4
#define S_EMPTY_MT 5
#define S_JSONTYPE 6

enum { K_AUTO, K_ARRAY, K_OBJECT, K_EMPTY_ARRAY };

typedef struct {
  int key;           /* stack slot of the key string; 0: an array index */
  lua_Integer index; /* 1-based, as in Lua */
} json_step;

typedef struct {
  const char *s;     /* the key's bytes (the key is anchored: see enc_object) */
  size_t len;
  int slot;          /* stack slot of the key (its value is at slot + 1), or 0 */
  lua_Integer at;    /* when slot is 0: the key's index in the anchor table */
} json_entry;

typedef struct {
  lua_State *L;
  lua_Alloc alloc;
  void *ud;
  char *buf;
  size_t len, cap;
  json_entry *ent;
  size_t nent, capent;
  int depth; /* tables open */
  int busy;
  const void *open[MAX_DEPTH]; /* the open tables, outermost first */
  json_step step[MAX_DEPTH];   /* step[i]: where in open[i] we are */
} json_enc;

static void enc_value(json_enc *e, int idx);

/* ---------------------------------------------------------------- errors */

static int ident(const char *s, size_t n) {
  size_t i;
  if (n == 0 || (s[0] >= '0' && s[0] <= '9')) return 0;
  for (i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (!(c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')))
      return 0;
  }
  return 1;
}

static size_t utf8_seq(const unsigned char *p, const unsigned char *end);

static size_t utf8_bad(const char *s, size_t n) {
  const unsigned char *p = (const unsigned char *)s, *end = p + n;
  while (p < end) {
    size_t k = *p < 0x80 ? 1 : utf8_seq(p, end);
    if (!k) return 1 + (size_t)(p - (const unsigned char *)s);
    p += k;
  }
  return 0;
}

/* A key as it appears in a path or a message: "..." with `"` and `\`
 * escaped, control bytes (and, in a key that is not UTF-8, bytes >= 0x80)
 * as \xNN, cut after KEY_SHOWN bytes. */
static void add_quoted(luaL_Buffer *b, const char *s, size_t n) {
  int raw_high = !utf8_bad(s, n);
  size_t i, shown = n;
  if (shown > KEY_SHOWN) {
    shown = KEY_SHOWN;
    while (shown > 0 && ((unsigned char)s[shown] & 0xC0) == 0x80) shown--;
  }
  luaL_addchar(b, '"');
  for (i = 0; i < shown; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\') {
      luaL_addchar(b, '\\');
      luaL_addchar(b, (char)c);
    } else if (c < 0x20 || c == 0x7f || (c >= 0x80 && !raw_high)) {
      char hex[5];
      snprintf(hex, sizeof hex, "\\x%02x", c);
      luaL_addlstring(b, hex, 4);
    } else {
      luaL_addchar(b, (char)c);
    }
  }
  if (shown < n) luaL_addlstring(b, "...", 3);
  luaL_addchar(b, '"');
}

/* Pushes the path of the value reached through the first nsteps steps. */
static void push_path(json_enc *e, int nsteps) {
  lua_State *L = e->L;
  luaL_Buffer b;
  int i;
  luaL_buffinit(L, &b);
  luaL_addchar(&b, '$');
  for (i = 0; i < nsteps; i++) {
    const json_step *st = &e->step[i];
    if (st->key) {
      size_t n;
      const char *s = lua_tolstring(L, st->key, &n);
      if (ident(s, n) && n <= KEY_SHOWN) {
        luaL_addchar(&b, '.');
        luaL_addlstring(&b, s, n);
      } else {
        luaL_addchar(&b, '[');
        add_quoted(&b, s, n);
        luaL_addchar(&b, ']');
      }
    } else {
      char num[32];
      snprintf(num, sizeof num, "[%lld]", (long long)st->index);
      luaL_addstring(&b, num);
    }
  }
  luaL_pushresult(&b);
}

/* Raises "slm.json: <what> at <path of the first nsteps steps><tail>". */
static int fail(json_enc *e, int nsteps, const char *what, const char *tail) {
  lua_State *L = e->L;
  push_path(e, nsteps);
  return luaL_error(L, "slm.json: %s at %s%s", what, lua_tostring(L, -1), tail ? tail : "");
}

/* The same with the key at stack slot k quoted into the message: "<pre>"key"<post>". */
static int fail_key(json_enc *e, int nsteps, const char *pre, int k, const char *post) {
  lua_State *L = e->L;
  luaL_Buffer b;
  size_t n;
  const char *s = lua_tolstring(L, k, &n);
  luaL_buffinit(L, &b);
  luaL_addstring(&b, pre);
  add_quoted(&b, s, n);
  luaL_addstring(&b, post);
  luaL_pushresult(&b);
  return fail(e, nsteps, lua_tostring(L, -1), NULL);
}

static int fail_oom(json_enc *e) {
  return luaL_error(e->L, "slm.json: out of memory");
}

/* ---------------------------------------------------------------- output */

#if defined(__GNUC__)
__attribute__((noinline))
#endif
static void grow(json_enc *e, size_t need) {
  size_t want = e->len + need, cap = e->cap ? e->cap : 1024;
  char *p;
  if (want < e->len) fail_oom(e);
  while (cap < want) {
    if (cap > ((size_t)-1) / 2) {
      cap = want;
      break;
    }
    cap *= 2;
  }
  p = (char *)e->alloc(e->ud, e->buf, e->cap, cap);
  if (!p) fail_oom(e);
  e->buf = p;
  e->cap = cap;
}

/* Room for n more bytes; returns where they go. */
static inline char *room(json_enc *e, size_t n) {
  if (e->cap - e->len < n) grow(e, n);
  return e->buf + e->len;
}

static void put(json_enc *e, const char *s, size_t n) {
  memcpy(room(e, n), s, n);
  e->len += n;
}

static void put_char(json_enc *e, char c) {
  *room(e, 1) = c;
  e->len++;
}

#define PUT_LIT(e, s) put((e), (s), sizeof(s) - 1)

static void put_int(json_enc *e, lua_Integer v) {
  char tmp[24], *end = tmp + sizeof tmp, *p = end;
  unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
  do {
    *--p = (char)('0' + (int)(u % 10));
    u /= 10;
  } while (u);
  if (v < 0) *--p = '-';
  put(e, p, (size_t)(end - p));
}

static void put_double(json_enc *e, lua_Number x) {
  char tmp[40];
  int n = 0, prec;
  if (isnan(x)) fail(e, e->depth, "cannot encode NaN (JSON has no NaN)", NULL);
  if (isinf(x))
    fail(e, e->depth, x > 0 ? "cannot encode inf (JSON has no infinities)"
                            : "cannot encode -inf (JSON has no infinities)", NULL);
  /* integral and within int64: print the integer (the check on the range
   * comes first: converting anything outside it would be undefined) */
  if (x >= -0x1p63 && x < 0x1p63) {
    lua_Integer i = (lua_Integer)x;
    if ((lua_Number)i == x) {
      if (i == 0 && signbit(x)) PUT_LIT(e, "-0");
      else put_int(e, i);
      return;
    }
  }
  for (prec = 15; prec <= 17; prec++) {
    n = snprintf(tmp, sizeof tmp, "%.*g", prec, (double)x);
    if (prec == 17 || strtod(tmp, NULL) == (double)x) break;
  }
  if (n <= 0 || n >= (int)sizeof tmp) fail(e, e->depth, "cannot format a number", NULL);
  { /* %g and strtod follow LC_NUMERIC; JSON wants '.' */
    char dp = localeconv()->decimal_point[0];
    if (dp != '.') {
      char *p = strchr(tmp, dp);
      if (p) *p = '.';
    }
  }
  put(e, tmp, (size_t)n);
}

/* Length of the valid UTF-8 sequence starting at p (*p >= 0x80), or 0. */
static size_t utf8_seq(const unsigned char *p, const unsigned char *end) {
  unsigned c = p[0];
  size_t left = (size_t)(end - p);
  unsigned lo = 0x80, hi = 0xBF;
  if (c < 0xC2) return 0; /* continuation byte, or overlong C0/C1 */
  if (c < 0xE0) return left >= 2 && (p[1] & 0xC0) == 0x80 ? 2 : 0;
  if (c < 0xF0) {
    if (c == 0xE0) lo = 0xA0;      /* overlong */
    else if (c == 0xED) hi = 0x9F; /* surrogates */
    return left >= 3 && p[1] >= lo && p[1] <= hi && (p[2] & 0xC0) == 0x80 ? 3 : 0;
  }
  if (c < 0xF5) {
    if (c == 0xF0) lo = 0x90;      /* overlong */
    else if (c == 0xF4) hi = 0x8F; /* above U+10FFFF */
    return left >= 4 && p[1] >= lo && p[1] <= hi && (p[2] & 0xC0) == 0x80 &&
           (p[3] & 0xC0) == 0x80 ? 4 : 0;
  }
  return 0;
}

#define B8(x) (0x0101010101010101ULL * (unsigned long long)(x))

/* Whether any of the 8 bytes of w is < 0x20, '"', '\\' or >= 0x80. */
static int special8(unsigned long long w) {
  unsigned long long q = w ^ B8('"'), b = w ^ B8('\\');
  unsigned long long lt = (w - B8(0x20)) & ~w;
  q = (q - B8(1)) & ~q;
  b = (b - B8(1)) & ~b;
  return ((lt | q | b | w) & B8(0x80)) != 0;
}

/* The class of each byte, for put_str: 0 printable ASCII and DEL (copied
 * as is), 1 control characters, '"' and '\\' (escaped), 2.. what a byte
 * of 0x80 and above may be in UTF-8 (RFC 3629, table 3-7 of Unicode):
 *   2: 80..8F  3: 90..9F  4: A0..BF  (continuation bytes)
 *   5: C0 C1 (overlong)  6: C2..DF  7: E0  8: E1..EC EE EF  9: ED
 *   10: F0  11: F1..F3  12: F4  13: F5..FF (beyond U+10FFFF) */
static const unsigned char byte_class[256] = {
  1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, /* 00 */
  1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, /* 10 */
  0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 20 " */
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 30 */
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 40 */
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, /* 50 \ */
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 60 */
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 70 */
  2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, /* 80 */
  3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, /* 90 */
  4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, /* A0 */
  4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, /* B0 */
  5, 5, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, /* C0 */
  6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, /* D0 */
  7, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 9, 8, 8, /* E0 */
  10, 11, 11, 11, 12, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, /* F0 */
};

/* A UTF-8 checker as a state machine over those classes.  States: 0 at a
 * character boundary; 1, 2, 3 continuation bytes still due; 4 after E0
 * (A0..BF next: no overlong form), 5 after ED (80..9F: no surrogate),
 * 6 after F0 (90..BF: no overlong form), 7 after F4 (80..8F: nothing
 * above U+10FFFF); 8 invalid (and stays so).
 *
 * State s is kept as the bit offset 6 * s, and utf8_row[class] holds, at
 * bit offset 6 * s, the offset of the state that follows s: one shift and
 * one mask per byte, and the loads do not wait on the state. */
#define U8_BAD (8 * 6)
#define U8ROW(s0, s1, s2, s3, s4, s5, s6, s7, s8)                              \
  ((s0) * 6ULL | (s1) * 6ULL << 6 | (s2) * 6ULL << 12 | (s3) * 6ULL << 18 |   \
   (s4) * 6ULL << 24 | (s5) * 6ULL << 30 | (s6) * 6ULL << 36 |                \
   (s7) * 6ULL << 42 | (s8) * 6ULL << 48)
static const unsigned long long utf8_row[14] = {
  /*   next state after state: 0  1  2  3  4  5  6  7  8 */
  U8ROW(0, 8, 8, 8, 8, 8, 8, 8, 8), /* ASCII */
  U8ROW(0, 8, 8, 8, 8, 8, 8, 8, 8), /* ASCII to escape */
  U8ROW(8, 0, 1, 2, 8, 1, 8, 2, 8), /* 80..8F */
  U8ROW(8, 0, 1, 2, 8, 1, 2, 8, 8), /* 90..9F */
  U8ROW(8, 0, 1, 2, 1, 8, 2, 8, 8), /* A0..BF */
  U8ROW(8, 8, 8, 8, 8, 8, 8, 8, 8), /* C0 C1 */
  U8ROW(1, 8, 8, 8, 8, 8, 8, 8, 8), /* C2..DF */
  U8ROW(4, 8, 8, 8, 8, 8, 8, 8, 8), /* E0 */
  U8ROW(2, 8, 8, 8, 8, 8, 8, 8, 8), /* E1..EC EE EF */
  U8ROW(5, 8, 8, 8, 8, 8, 8, 8, 8), /* ED */
  U8ROW(6, 8, 8, 8, 8, 8, 8, 8, 8), /* F0 */
  U8ROW(3, 8, 8, 8, 8, 8, 8, 8, 8), /* F1..F3 */
  U8ROW(7, 8, 8, 8, 8, 8, 8, 8, 8), /* F4 */
  U8ROW(8, 8, 8, 8, 8, 8, 8, 8, 8), /* F5..FF */
};

/* Appends s as a JSON string (and a ':' after it when colon).  Returns 0,
 * or 1 + the offset of the first byte that is not valid UTF-8.
 *
 * Runs of printable ASCII go 8 bytes at a time, then byte by byte up to
 * the next byte that is not.  A byte of 0x80 or above starts a loop that
 * copies bytes while stepping the UTF-8 state machine (no branch on the
 * kind of character), over the ASCII between characters too (spaces,
 * punctuation) until an escape or 8 ASCII bytes in a row: text in other
 * scripts does not pay for an 8-byte test that fails at every character. */
static size_t put_str(json_enc *e, const char *str, size_t n, int colon) {
  static const char hex[] = "0123456789abcdef";
  const unsigned char *s = (const unsigned char *)str, *p = s, *end = s + n;
  unsigned char *o;
  if (n > ((size_t)-1) - 8) fail_oom(e);
  o = (unsigned char *)room(e, n + 3);
  *o++ = '"';
  for (;;) {
    unsigned c;
    while (end - p >= 8) {
      unsigned long long w;
      memcpy(&w, p, 8);
      if (special8(w)) break;
      memcpy(o, p, 8);
      o += 8;
      p += 8;
    }
    while (p < end && byte_class[*p] == 0) *o++ = *p++;
    if (p == end) break;
    c = *p;
    if (c >= 0x80) {
      /* copy while checking; on the first escape, or after 8 ASCII bytes in
       * a row, back to the loops above */
      unsigned long long st = 0;
      unsigned ascii = 0;
      do {
        unsigned k = byte_class[*p];
        if (k == 1) break;
        *o++ = *p++;
        st = (utf8_row[k] >> st) & 63;
        ascii = k == 0 ? ascii + 1 : 0;
      } while (st != U8_BAD && p < end && ascii < 8);
      if (st != 0) { /* invalid, or a sequence cut short: where does it start? */
        size_t bad = utf8_bad(str, n);
        e->len = (size_t)((char *)o - e->buf);
        return bad ? bad : 1 + (size_t)(p - s);
      }
      continue;
    }
    /* an escape: up to 6 bytes for this one, the rest may be copied as is */
    if ((size_t)(e->buf + e->cap - (char *)o) < 6 + (size_t)(end - p) + 2) {
      e->len = (size_t)((char *)o - e->buf);
      o = (unsigned char *)room(e, 6 + (size_t)(end - p) + 2);
    }
    *o++ = '\\';
    switch (c) {
    case '"': *o++ = '"'; break;
    case '\\': *o++ = '\\'; break;
    case '\b': *o++ = 'b'; break;
    case '\f': *o++ = 'f'; break;
    case '\n': *o++ = 'n'; break;
    case '\r': *o++ = 'r'; break;
    case '\t': *o++ = 't'; break;
    default:
      *o++ = 'u';
      *o++ = '0';
      *o++ = '0';
      *o++ = (unsigned char)hex[c >> 4];
      *o++ = (unsigned char)hex[c & 15];
    }
    p++;
  }
  *o++ = '"';
  if (colon) *o++ = ':';
  e->len = (size_t)((char *)o - e->buf);
  return 0;
}

/* ---------------------------------------------------------------- tables */

/* Whether the value at idx is an integer (an integral number within
 * lua_Integer, for LuaJIT whose numbers are doubles); stores it in *k. */
static int int_key(lua_State *L, int idx, lua_Integer *k) {
#if LUA_VERSION_NUM >= 503
  if (!lua_isinteger(L, idx)) return 0;
  *k = lua_tointeger(L, idx);
  return 1;
#else
  lua_Number d;
  if (lua_type(L, idx) != LUA_TNUMBER) return 0;
  d = lua_tonumber(L, idx);
  if (!(d >= -0x1p63 && d < 0x1p63) || (lua_Number)(lua_Integer)d != d) return 0;
  *k = (lua_Integer)d;
  return 1;
#endif
}

static int is_index(lua_State *L, int idx, lua_Integer want) {
  lua_Integer k;
  return int_key(L, idx, &k) && k == want;
}

/* The key at slot k cannot be an object key, nor an array index: raise. */
static int fail_bad_key(json_enc *e, int k, int kind) {
  lua_State *L = e->L;
  lua_Integer i;
  int d = e->depth - 1;
  char msg[96];
  if (int_key(L, k, &i)) {
    snprintf(msg, sizeof msg, kind == K_OBJECT
             ? "cannot encode the integer key %lld of a table marked as an object"
             : "cannot encode a table with both integer and string keys (integer key %lld)",
             (long long)i);
  } else if (lua_type(L, k) == LUA_TNUMBER) {
    snprintf(msg, sizeof msg, "cannot encode a table with the number key %.17g", (double)lua_tonumber(L, k));
  } else {
    snprintf(msg, sizeof msg, "cannot encode a table with a %s key", luaL_typename(L, k));
  }
  return fail(e, d, msg, NULL);
}

static int entry_cmp(const void *a, const void *b) {
  const json_entry *x = (const json_entry *)a, *y = (const json_entry *)b;
  size_t n = x->len < y->len ? x->len : y->len;
  int c = memcmp(x->s, y->s, n);
  if (c) return c;
  return x->len < y->len ? -1 : x->len > y->len;
}

static void sort_entries(json_entry *v, size_t n) {
  size_t i, j;
  if (n > 16) {
    qsort(v, n, sizeof *v, entry_cmp);
    return;
  }
  for (i = 1; i < n; i++) {
    json_entry x = v[i];
    for (j = i; j > 0 && entry_cmp(&v[j - 1], &x) > 0; j--) v[j] = v[j - 1];
    v[j] = x;
  }
}

/* Records the key at stack slot k, which is either kept there (slot) or
 * stored at index `at` of the anchor table. */
static void add_entry(json_enc *e, int k, int slot, lua_Integer at) {
  json_entry *en;
  if (e->nent == e->capent) {
    size_t cap = e->capent ? e->capent * 2 : 64;
    void *p;
    if (cap > ((size_t)-1) / sizeof *en) fail_oom(e);
    p = e->alloc(e->ud, e->ent, e->capent * sizeof *en, cap * sizeof *en);
    if (!p) fail_oom(e);
    e->ent = (json_entry *)p;
    e->capent = cap;
  }
  en = &e->ent[e->nent++];
  en->slot = slot;
  en->at = at;
  en->s = lua_tolstring(e->L, k, &en->len);
}

/* An object, from the first pair lua_next pushed (a string key and its
 * value on top of the stack) on.  The keys must stay alive, and their
 * bytes where they are, until they are sorted and written: the first
 * STACK_PAIRS pairs stay on the stack (no allocation for the usual small
 * object); the keys after them go into an anchor table, so that a large
 * object, or many nested ones, never fill the Lua stack (LuaJIT allows a C
 * function 8000 slots). */
static void enc_object(json_enc *e, int t, int kind) {
  lua_State *L = e->L;
  int d = e->depth - 1, top0 = lua_gettop(L) - 2, anchor = 0;
  size_t base = e->nent, n, j;
  lua_Integer na = 0;
  /* the pairs kept, one more for lua_next, the anchor table */
  if (!lua_checkstack(L, 2 * STACK_PAIRS + 4)) fail(e, d, "cannot encode: the Lua stack is full", NULL);
  for (;;) {
    int k = lua_gettop(L) - 1;
    if (lua_type(L, k) != LUA_TSTRING) fail_bad_key(e, k, kind);
    if (!anchor && e->nent - base < STACK_PAIRS) {
      add_entry(e, k, k, 0);
      lua_pushvalue(L, k); /* for lua_next; the pair stays */
    } else {
      if (!anchor) { /* below this pair: the pairs so far keep their slots */
        lua_newtable(L);
        lua_insert(L, k);
        anchor = k++;
      }
      lua_pop(L, 1);
      lua_pushvalue(L, k);
      slm_rawseti(L, anchor, ++na);
      add_entry(e, k, 0, na); /* the key on top goes to lua_next */
    }
    if (!lua_next(L, t)) break;
  }
  n = e->nent - base;
  sort_entries(e->ent + base, n);
  if (!lua_checkstack(L, 4)) fail(e, d, "cannot encode: the Lua stack is full", NULL);
  put_char(e, '{');
  for (j = 0; j < n; j++) {
    const json_entry *en = &e->ent[base + j]; /* valid until enc_value: */
    int k = en->slot, stacked = k != 0;         /* add_entry may move e->ent */
    size_t bad;
    if (j) put_char(e, ',');
    if (!k) { /* the key and its value on top */
      (void)slm_rawgeti(L, anchor, en->at);
      k = lua_gettop(L);
      lua_pushvalue(L, k);
      lua_rawget(L, t);
    }
    bad = put_str(e, en->s, en->len, 1);
    if (bad) {
      char msg[80];
      snprintf(msg, sizeof msg, "invalid UTF-8 at byte %lu of the key ", (unsigned long)bad);
      fail_key(e, d, msg, k, "");
    }
    e->step[d].key = k;
    enc_value(e, k + 1);
    if (!stacked) lua_pop(L, 2);
  }
  put_char(e, '}');
  e->nent = base;
  lua_settop(L, top0);
}

/* An array whose traversal order is 1, 2, ..., n (the usual case: Lua
 * keeps such keys in the table's array part), written while traversing.
 * Entered with key 1 and its value on top.  Returns 0 (with the output
 * and the stack as they were before key 1) when another key turns up. */
static int enc_array_inorder(json_enc *e, int t) {
  lua_State *L = e->L;
  int d = e->depth - 1;
  size_t mark = e->len;
  lua_Integer i = 1;
  put_char(e, '[');
  for (;;) {
    e->step[d].key = 0;
    e->step[d].index = i;
    enc_value(e, lua_gettop(L));
    lua_pop(L, 1);
    if (!lua_next(L, t)) break;
    if (!is_index(L, -2, ++i)) {
      lua_pop(L, 2);
      e->len = mark;
      return 0;
    }
    put_char(e, ',');
  }
  put_char(e, ']');
  return 1;
}

/* Any other table (its first key is not 1, or the keys after 1 did not
 * come in order): look at every key first, then write it as an array. */
static void enc_checked(json_enc *e, int t, int kind) {
  lua_State *L = e->L;
  int d = e->depth - 1;
  lua_Integer nint = 0, max = 0, k, i;
  size_t nstr = 0;
  char msg[128];
  lua_pushnil(L);
  while (lua_next(L, t)) {
    lua_pop(L, 1);
    if (int_key(L, -1, &k)) {
      if (kind == K_OBJECT || nstr) fail_bad_key(e, lua_gettop(L), kind);
      if (k < 1) {
        snprintf(msg, sizeof msg, "cannot encode a sparse array (key %lld; arrays are 1..n)", (long long)k);
        fail(e, d, msg, NULL);
      }
      nint++;
      if (k > max) max = k;
    } else if (lua_type(L, -1) == LUA_TSTRING) {
      if (kind == K_ARRAY) fail_key(e, d, "cannot encode the string key ", lua_gettop(L), " of a table marked as an array");
      if (nint) fail_key(e, d, "cannot encode a table with both integer and string keys (string key ", lua_gettop(L), ")");
      nstr++;
    } else {
      fail_bad_key(e, lua_gettop(L), kind);
    }
  }
  /* here every key is an integer: enc_table sends a table whose first key
   * is a string to enc_object, unless it is marked as an array, and any
   * string key after an integer one has failed above */
  if (max != nint) {
    snprintf(msg, sizeof msg, "cannot encode a sparse array (%lld elements, largest key %lld)",
             (long long)nint, (long long)max);
    fail(e, d, msg, NULL);
  }
  put_char(e, '[');
  for (i = 1; i <= max; i++) {
    if (i > 1) put_char(e, ',');
    e->step[d].key = 0;
    e->step[d].index = i;
    (void)slm_rawgeti(L, t, i);
    enc_value(e, lua_gettop(L));
    lua_pop(L, 1);
  }
  put_char(e, ']');
}

/* What the metatable on top of the stack says the table is (pops it). */
static int meta_kind(json_enc *e) {
  lua_State *L = e->L;
  int kind = K_AUTO;
  lua_pushvalue(L, S_JSONTYPE);
  lua_rawget(L, -2);
  if (lua_type(L, -1) == LUA_TSTRING) {
    const char *s = lua_tostring(L, -1);
    if (strcmp(s, "array") == 0) kind = K_ARRAY;
    else if (strcmp(s, "object") == 0) kind = K_OBJECT;
  }
  if (kind == K_AUTO && !lua_isnil(L, -1)) {
    if (lua_type(L, -1) == LUA_TSTRING)
      fail_key(e, e->depth, "__jsontype must be \"array\" or \"object\", not ", lua_gettop(L), "");
    lua_pushfstring(L, "__jsontype must be \"array\" or \"object\", not a %s", luaL_typename(L, -1));
    fail(e, e->depth, lua_tostring(L, -1), NULL);
  }
  lua_pop(L, 1);
  if (kind == K_AUTO) {
    if (!lua_isnil(L, S_ARRAY_MT) && lua_rawequal(L, -1, S_ARRAY_MT)) kind = K_ARRAY;
    else if (!lua_isnil(L, S_EMPTY_MT) && lua_rawequal(L, -1, S_EMPTY_MT)) kind = K_EMPTY_ARRAY;
  }
  lua_pop(L, 1);
  return kind;
}

static void enc_table(json_enc *e, int t) {
  lua_State *L = e->L;
  int d = e->depth, kind = K_AUTO, i;
  const void *p = lua_topointer(L, t);
  if (d >= MAX_DEPTH) fail(e, d, "cannot encode tables nested more than 64 deep", NULL);
  for (i = 0; i < d; i++) {
    if (e->open[i] == p) {
      push_path(e, i);
      lua_pushfstring(L, " (the same table as at %s)", lua_tostring(L, -1));
      fail(e, d, "cannot encode a cycle", lua_tostring(L, -1));
    }
  }
  if (lua_getmetatable(L, t)) kind = meta_kind(e);
  if (!lua_checkstack(L, 8)) fail(e, d, "cannot encode: the Lua stack is full", NULL);
  e->open[d] = p;
  e->depth = d + 1;
  lua_pushnil(L);
  if (!lua_next(L, t)) {
    if (kind == K_ARRAY || kind == K_EMPTY_ARRAY) PUT_LIT(e, "[]");
    else PUT_LIT(e, "{}");
  } else if (kind != K_OBJECT && is_index(L, -2, 1)) {
    if (!enc_array_inorder(e, t)) enc_checked(e, t, kind);
  } else if (kind != K_ARRAY && lua_type(L, -2) == LUA_TSTRING) {
    enc_object(e, t, kind);
  } else {
    lua_pop(L, 2);
    enc_checked(e, t, kind);
  }
  e->depth = d;
}

/* ---------------------------------------------------------------- values */

static void enc_value(json_enc *e, int idx) {
  lua_State *L = e->L;
  switch (lua_type(L, idx)) {
  case LUA_TSTRING: {
    size_t n, bad;
    const char *s = lua_tolstring(L, idx, &n);
    bad = put_str(e, s, n, 0);
    if (bad) {
      char msg[80];
      snprintf(msg, sizeof msg, "invalid UTF-8 at byte %lu of the string", (unsigned long)bad);
      fail(e, e->depth, msg, NULL);
    }
    return;
  }
  case LUA_TNUMBER:
#if LUA_VERSION_NUM >= 503
    if (lua_isinteger(L, idx)) {
      put_int(e, lua_tointeger(L, idx));
      return;
    }
#endif
    put_double(e, lua_tonumber(L, idx));
    return;
  case LUA_TTABLE:
    enc_table(e, idx);
    return;
  case LUA_TBOOLEAN:
    if (lua_toboolean(L, idx)) PUT_LIT(e, "true");
    else PUT_LIT(e, "false");
    return;
  case LUA_TNIL:
    PUT_LIT(e, "null");
    return;
  case LUA_TLIGHTUSERDATA:
    if (lua_touserdata(L, idx) == NULL) {
      PUT_LIT(e, "null");
      return;
    }
    if (lua_rawequal(L, idx, S_EMPTY_ARRAY)) {
      PUT_LIT(e, "[]");
      return;
    }
    fail(e, e->depth, "cannot encode a light userdata other than slm.json.null", NULL);
    return;
  default: {
    char msg[64];
    snprintf(msg, sizeof msg, "cannot encode a %s", luaL_typename(L, idx));
    fail(e, e->depth, msg, NULL);
  }
  }
}

/* ------------------------------------------------------------- the calls */

static void enc_release(json_enc *e) {
  if (e->buf) e->alloc(e->ud, e->buf, e->cap, 0);
  if (e->ent) e->alloc(e->ud, e->ent, e->capent * sizeof *e->ent, 0);
  e->buf = NULL;
  e->ent = NULL;
  e->cap = e->len = e->capent = e->nent = 0;
}

static int enc_gc(lua_State *L) {
  enc_release((json_enc *)luaL_checkudata(L, 1, ENC_MT));
  return 0;
}

static json_enc *new_encoder(lua_State *L) {
  json_enc *e = (json_enc *)slm_newuserdata(L, sizeof *e);
  memset(e, 0, sizeof *e);
  e->alloc = lua_getallocf(L, &e->ud);
  luaL_setmetatable(L, ENC_MT);
  return e;
}

/* Runs under lua_pcall: the encoder, the value, opts' empty_array,
 * array_mt and empty_array_mt (or nils), the string "__jsontype". */
static int json_run(lua_State *L) {
  json_enc *e = (json_enc *)lua_touserdata(L, S_ENC);
  lua_settop(L, S_JSONTYPE);
  e->L = L;
  e->len = 0;
  e->nent = 0;
  e->depth = 0;
  enc_value(e, S_VALUE);
  lua_pushlstring(L, e->buf ? e->buf : "", e->len);
  return 1;
}

static const char *const opt_names[] = { "empty_array", "array_mt", "empty_array_mt", NULL };

/* core.json_encode(value [, opts]) -> string */
static int l_json_encode(lua_State *L) {
  json_enc *e = (json_enc *)lua_touserdata(L, lua_upvalueindex(1));
  int i, rc;
  luaL_checkany(L, 1);
  lua_settop(L, 2);
  if (!lua_isnil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_pushnil(L);
    while (lua_next(L, 2)) {
      const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
      for (i = 0; k && opt_names[i]; i++)
        if (strcmp(k, opt_names[i]) == 0) break;
      if (!k || !opt_names[i])
        return luaL_argerror(L, 2, lua_pushfstring(L, "unknown option '%s'", k ? k : luaL_typename(L, -2)));
      if (i == 0 ? lua_type(L, -1) != LUA_TLIGHTUSERDATA : !lua_istable(L, -1))
        return luaL_argerror(L, 2, lua_pushfstring(L, "option '%s' must be a %s", k,
                                                   i == 0 ? "light userdata" : "table"));
      lua_pop(L, 1);
    }
  }
  lua_pushvalue(L, lua_upvalueindex(2)); /* json_run */
  if (e->busy) e = new_encoder(L);
  else lua_pushvalue(L, lua_upvalueindex(1));
  lua_pushvalue(L, 1);
  for (i = 0; opt_names[i]; i++) {
    if (lua_isnil(L, 2)) lua_pushnil(L);
    else lua_getfield(L, 2, opt_names[i]);
  }
  lua_pushvalue(L, lua_upvalueindex(3)); /* "__jsontype" */
  e->busy = 1;
  rc = lua_pcall(L, 6, 1, 0);
  e->busy = 0;
  if (e->cap > KEEP_MAX || e->capent * sizeof *e->ent > KEEP_MAX) enc_release(e);
  if (rc != LUA_OK) return lua_error(L);
  return 1;
}

int slm_open_json(lua_State *L) {
  static const luaL_Reg no_methods[] = { { NULL, NULL } };
  slm_new_class(L, ENC_MT, no_methods, enc_gc, NULL);
  new_encoder(L);
  lua_pushcfunction(L, json_run);
  lua_pushliteral(L, "__jsontype");
  lua_pushcclosure(L, l_json_encode, 3);
  lua_setfield(L, -2, "json_encode");
  return 0;
}
