/*
 * fuzz_json.c - libFuzzer harness for the JSON encoder (csrc/json.c),
 * through the same Lua binding users call (core.json_encode, slm.json).
 *
 * The fuzz bytes are a little program that fuzz_json.lua (next to this
 * file) turns into a Lua value: scalars of every type (integers and
 * doubles from raw bits, NaN and infinities included), strings of raw
 * bytes or of code points (surrogates and all), arrays, objects, marked
 * arrays and objects, cjson-style markers passed as opts, mixed, sparse
 * and oddly keyed tables, functions, userdata, light userdata, shared
 * tables, cycles and deep nests.  For each value:
 *  - the encoder and an independent reference encoder written in Lua from
 *    the documented rules must agree: both refuse it, or both give the
 *    same bytes;
 *  - a refusal must be a "slm.json: ... at $..." message;
 *  - accepted output must be strict RFC 8259 JSON in valid UTF-8 (the
 *    checker below, in C, shares no code with either encoder), and
 *    lua-cjson must decode it to a value equal to the input.
 * Any disagreement aborts.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "slm.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static lua_State *L;
static int ref_run = LUA_NOREF;

/* ------------------------------------------------ strict JSON checker */

typedef struct {
  const unsigned char *p, *end;
  int depth;
} jcheck;

static int ck_value(jcheck *c);

static int ck_lit(jcheck *c, const char *lit) {
  size_t n = strlen(lit);
  if ((size_t)(c->end - c->p) < n || memcmp(c->p, lit, n) != 0) return 0;
  c->p += n;
  return 1;
}

static int is_digit(const jcheck *c) { return c->p < c->end && *c->p >= '0' && *c->p <= '9'; }

static int ck_number(jcheck *c) {
  if (c->p < c->end && *c->p == '-') c->p++;
  if (!is_digit(c)) return 0;
  if (*c->p == '0') c->p++;
  else while (is_digit(c)) c->p++;
  if (c->p < c->end && *c->p == '.') {
    c->p++;
    if (!is_digit(c)) return 0;
    while (is_digit(c)) c->p++;
  }
  if (c->p < c->end && (*c->p == 'e' || *c->p == 'E')) {
    c->p++;
    if (c->p < c->end && (*c->p == '+' || *c->p == '-')) c->p++;
    if (!is_digit(c)) return 0;
    while (is_digit(c)) c->p++;
  }
  return 1;
}

static int hexval(unsigned char h) {
  if (h >= '0' && h <= '9') return h - '0';
  if (h >= 'a' && h <= 'f') return h - 'a' + 10;
  if (h >= 'A' && h <= 'F') return h - 'A' + 10;
  return -1;
}

/* One UTF-8 character, decoded: the code point must need exactly the
 * bytes used, and be a scalar value (no surrogates, <= U+10FFFF). */
static int ck_utf8(jcheck *c) {
  unsigned char b = *c->p;
  int need, i;
  unsigned long cp, min;
  if (b >= 0xF0 && b <= 0xF7) need = 3, cp = b & 0x07, min = 0x10000;
  else if (b >= 0xE0 && b <= 0xEF) need = 2, cp = b & 0x0F, min = 0x800;
  else if (b >= 0xC0 && b <= 0xDF) need = 1, cp = b & 0x1F, min = 0x80;
  else return 0;
  if (c->end - c->p <= need) return 0;
  for (i = 1; i <= need; i++) {
    if ((c->p[i] & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (c->p[i] & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  c->p += need + 1;
  return 1;
}

static int ck_string(jcheck *c) {
  if (c->p >= c->end || *c->p != '"') return 0;
  c->p++;
  for (;;) {
    unsigned char b;
    if (c->p >= c->end) return 0;
    b = *c->p;
    if (b == '"') {
      c->p++;
      return 1;
    }
    if (b < 0x20) return 0;
    if (b == '\\') {
      if (c->end - c->p < 2) return 0;
      b = c->p[1];
      if (b == 'u') {
        int i;
        if (c->end - c->p < 6) return 0;
        for (i = 2; i < 6; i++)
          if (hexval(c->p[i]) < 0) return 0;
        c->p += 6;
      } else if (strchr("\"\\/bfnrt", b) && b) {
        c->p += 2;
      } else {
        return 0;
      }
    } else if (b >= 0x80) {
      if (!ck_utf8(c)) return 0;
    } else {
      c->p++;
    }
  }
}

static void ck_ws(jcheck *c) {
  while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

static int ck_value(jcheck *c) {
  ck_ws(c);
  if (c->p >= c->end) return 0;
  switch (*c->p) {
  case '{':
  case '[': {
    unsigned char close = *c->p == '{' ? '}' : ']';
    int object = close == '}';
    if (++c->depth > 200) return 0;
    c->p++;
    ck_ws(c);
    if (c->p < c->end && *c->p == close) {
      c->p++;
      c->depth--;
      return 1;
    }
    for (;;) {
      if (object) {
        ck_ws(c);
        if (!ck_string(c)) return 0;
        ck_ws(c);
        if (c->p >= c->end || *c->p != ':') return 0;
        c->p++;
      }
      if (!ck_value(c)) return 0;
      ck_ws(c);
      if (c->p >= c->end) return 0;
      if (*c->p == ',') {
        c->p++;
        continue;
      }
      if (*c->p != close) return 0;
      c->p++;
      c->depth--;
      return 1;
    }
  }
  case '"': return ck_string(c);
  case 't': return ck_lit(c, "true");
  case 'f': return ck_lit(c, "false");
  case 'n': return ck_lit(c, "null");
  default: return ck_number(c);
  }
}

/* valid_json(s) -> boolean */
static int l_valid_json(lua_State *l) {
  size_t n;
  const char *s = luaL_checklstring(l, 1, &n);
  jcheck c;
  int ok;
  c.p = (const unsigned char *)s;
  c.end = c.p + n;
  c.depth = 0;
  ok = ck_value(&c);
  ck_ws(&c);
  lua_pushboolean(l, ok && c.p == c.end);
  return 1;
}

/* ------------------------------------------------------------ harness */

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  char dir[4096], path[4200];
  const char *lua_file = getenv("SLM_FUZZ_JSON_LUA");
  static int anchor;
  (void)argc;
  (void)argv;
  snprintf(dir, sizeof dir, "%s", __FILE__);
  if (strrchr(dir, '/')) *strrchr(dir, '/') = '\0';
  else snprintf(dir, sizeof dir, "tests/fuzz");
  if (!lua_file) {
    snprintf(path, sizeof path, "%s/fuzz_json.lua", dir);
    lua_file = path;
  }
  L = luaL_newstate();
  luaL_openlibs(L);
  /* slm.core stand-in holding only what json.c registers, so that the
   * real lua/slm/json.lua loads on top of it */
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "loaded");
  lua_newtable(L);
  slm_open_json(L);
  lua_setfield(L, -2, "slm.core");
  lua_pop(L, 2);
  if (luaL_loadfile(L, lua_file) != LUA_OK) {
    fprintf(stderr, "fuzz_json: cannot load %s: %s\n", lua_file, lua_tostring(L, -1));
    exit(1);
  }
  lua_pushstring(L, dir);
  lua_pushcfunction(L, l_valid_json);
  lua_pushlightuserdata(L, &anchor); /* a non-NULL light userdata */
  if (lua_pcall(L, 3, 1, 0) != LUA_OK) {
    fprintf(stderr, "fuzz_json: %s: %s\n", lua_file, lua_tostring(L, -1));
    exit(1);
  }
  ref_run = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_settop(L, 0);
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref_run);
  lua_pushlstring(L, (const char *)data, size);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
    fprintf(stderr, "fuzz_json: invariant broken: %s\n", lua_tostring(L, -1));
    abort();
  }
  return 0;
}
