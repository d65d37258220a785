/*
 * fuzz_sse_chat.c - differential libFuzzer harness for the chat-chunk fast
 * path of the SSE parser, slm_sse_chat_text (csrc/sse.h).
 *
 * Whenever the fast path accepts a chunk, an independent reference must
 * agree that it is a plain content-only chunk of choice 0 with the same
 * content bytes:
 *   - always: the JSON reader below (recursive descent that builds a tree,
 *     decodes every string, then looks the chunk up the way slm.accumulate
 *     reads it: last member wins, null counts as absent);
 *   - when lua-cjson can be loaded (require "cjson" in an embedded Lua
 *     state): cjson.decode and the same lookups in Lua, i.e. what the
 *     client would do with the chunk without the fast path.
 * Each chunk is also read with a warm cache (slm_sse_chat keeps the bytes of
 * the last accepted chunk up to its content string and resumes there) and
 * must give the same answer, byte for byte, as with a fresh state.
 *
 * Input: byte 0: bits 0-3 the `known` bits, bit 4 template mode, bit 5 two
 * chunks, bit 6 token mode (with bit 4: generator mode, see gchunk); byte 1: where the two chunks split; the rest is
 * the chunk.  In token mode each byte stands for one of TOKENS (JSON pieces
 * of chat chunks), so the fuzzer composes chunks from names and values that
 * matter instead of guessing them byte by byte.  In template mode the chunk
 * is TEMPLATE followed by the input, so the fuzzer mostly writes a content
 * string and what follows it.  In two-chunk mode the input is cut in two
 * and both halves go through one state (in template mode both start with
 * TEMPLATE, so the second may hit the cache), the second half also with
 * maybe fewer known bits than the first.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "sse.h"

static const char TEMPLATE[] =
  "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,"
  "\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"";

static const char *const TOKENS[] = {
  "{", "}", "[", "]", ",", ":", " ", "\n", "\"", "0", "1", "-0", "0.0", "1e2", "null", "true",
  "false", "\"\"", "\"x\"", "\"a\\nb\"", "\"\\ud83d\\ude00\"", "\"\\u00e9\"", "\"\\ud800\"",
  "\"\\\"\"", "\"choices\"", "\"index\"", "\"delta\"", "\"content\"", "\"role\"",
  "\"refusal\"", "\"reasoning\"", "\"reasoning_content\"", "\"tool_calls\"",
  "\"finish_reason\"", "\"logprobs\"", "\"message\"", "\"usage\"", "\"error\"", "\"id\"",
  "\"created\"", "\"model\"", "\"system_fingerprint\"", "\"object\"", "\"stop\"",
  "\"assistant\"", "\"con\\u0074ent\"", "[]", "{}", "\"content\":\"",
  "{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"", "\"}}]}", "\"},\"finish_reason\":null}]}",
  /* whole members, so that one mutation adds or drops one */
  ",\"content\":\"y\"", ",\"index\":0", ",\"index\":1", ",\"delta\":{\"content\":\"z\"}",
  ",\"finish_reason\":\"stop\"", ",\"finish_reason\":null", ",\"role\":\"assistant\"",
  ",\"role\":null", ",\"tool_calls\":[]", ",\"usage\":{}", ",\"usage\":null",
  ",\"choices\":[]", ",\"id\":\"x\"", ",\"id\":null", ",\"logprobs\":{\"a\":[1,{}]}",
  ",\"x\":\"\\u0041\"",
};
#define NTOKENS (sizeof TOKENS / sizeof TOKENS[0])

static void die(const char *what, const char *data, size_t len) {
  fprintf(stderr, "fuzz_sse_chat: %s\ninput (%zu bytes): ", what, len);
  fwrite(data, 1, len, stderr);
  fputc('\n', stderr);
  abort();
}

/* ---- the reference: a tree-building JSON reader ------------------------ */

typedef struct jv {
  char type;             /* n t f d s a o */
  char *s;               /* decoded string, or a number's text */
  size_t len;
  struct jv **item;      /* array items / object values */
  char **key;            /* object keys (decoded) */
  size_t *klen;
  size_t n, cap;
} jv;

typedef struct rd {
  const unsigned char *p, *e;
} rd;

static void jv_free(jv *v) {
  size_t i;
  if (!v) return;
  for (i = 0; i < v->n; i++) {
    jv_free(v->item[i]);
    if (v->key) free(v->key[i]);
  }
  free(v->item);
  free(v->key);
  free(v->klen);
  free(v->s);
  free(v);
}

static jv *jv_new(char type) {
  jv *v = (jv *)calloc(1, sizeof *v);
  if (!v) abort();
  v->type = type;
  return v;
}

static void ws(rd *r) {
  while (r->p < r->e && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r')) r->p++;
}

static int hexval(int c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

static int read_u(rd *r, long *u) { /* after "\u" */
  long x = 0;
  int i;
  if (r->e - r->p < 4) return 0;
  for (i = 0; i < 4; i++) {
    int h = hexval(r->p[i]);
    if (h < 0) return 0;
    x = x * 16 + h;
  }
  r->p += 4;
  *u = x;
  return 1;
}

/* Decodes a string at r->p ('"') into *out (malloc'd). */
static int read_string(rd *r, char **out, size_t *outlen) {
  size_t cap = 16, n = 0;
  char *b = (char *)malloc(cap);
  if (!b) abort();
  r->p++;
  for (;;) {
    unsigned char c;
    char tmp[4];
    size_t k = 0;
    if (r->p >= r->e) goto bad;
    c = *r->p++;
    if (c == '"') break;
    if (c < 0x20) goto bad;
    if (c != '\\') {
      tmp[k++] = (char)c;
    } else {
      if (r->p >= r->e) goto bad;
      c = *r->p++;
      if (c == 'u') {
        long u, lo;
        if (!read_u(r, &u)) goto bad;
        if (u >= 0xD800 && u < 0xDC00) {
          if (r->e - r->p < 2 || r->p[0] != '\\' || r->p[1] != 'u') goto bad;
          r->p += 2;
          if (!read_u(r, &lo) || lo < 0xDC00 || lo >= 0xE000) goto bad;
          u = 0x10000 + (u - 0xD800) * 0x400 + (lo - 0xDC00);
        } else if (u >= 0xDC00 && u < 0xE000) {
          goto bad;
        }
        if (u < 0x80) {
          tmp[k++] = (char)u;
        } else if (u < 0x800) {
          tmp[k++] = (char)(0xC0 + u / 64);
          tmp[k++] = (char)(0x80 + u % 64);
        } else if (u < 0x10000) {
          tmp[k++] = (char)(0xE0 + u / 4096);
          tmp[k++] = (char)(0x80 + u / 64 % 64);
          tmp[k++] = (char)(0x80 + u % 64);
        } else {
          tmp[k++] = (char)(0xF0 + u / 262144);
          tmp[k++] = (char)(0x80 + u / 4096 % 64);
          tmp[k++] = (char)(0x80 + u / 64 % 64);
          tmp[k++] = (char)(0x80 + u % 64);
        }
      } else {
        const char *from = "\"\\/bfnrt", *to = "\"\\/\b\f\n\r\t";
        const char *at = c ? strchr(from, c) : NULL;
        if (!at) goto bad;
        tmp[k++] = to[at - from];
      }
    }
    if (n + k > cap) {
      cap *= 2;
      b = (char *)realloc(b, cap);
      if (!b) abort();
    }
    memcpy(b + n, tmp, k);
    n += k;
  }
  *out = b;
  *outlen = n;
  return 1;
bad:
  free(b);
  return 0;
}

static int read_number(rd *r, jv *v) {
  const unsigned char *s = r->p;
  if (r->p < r->e && *r->p == '-') r->p++;
  if (r->p >= r->e) return 0;
  if (*r->p == '0') {
    r->p++;
  } else if (*r->p >= '1' && *r->p <= '9') {
    while (r->p < r->e && *r->p >= '0' && *r->p <= '9') r->p++;
  } else {
    return 0;
  }
  if (r->p < r->e && *r->p == '.') {
    r->p++;
    if (r->p >= r->e || *r->p < '0' || *r->p > '9') return 0;
    while (r->p < r->e && *r->p >= '0' && *r->p <= '9') r->p++;
  }
  if (r->p < r->e && (*r->p == 'e' || *r->p == 'E')) {
    r->p++;
    if (r->p < r->e && (*r->p == '+' || *r->p == '-')) r->p++;
    if (r->p >= r->e || *r->p < '0' || *r->p > '9') return 0;
    while (r->p < r->e && *r->p >= '0' && *r->p <= '9') r->p++;
  }
  v->len = (size_t)(r->p - s);
  v->s = (char *)malloc(v->len + 1);
  if (!v->s) abort();
  memcpy(v->s, s, v->len);
  v->s[v->len] = 0;
  return 1;
}

static void push(jv *v, jv *item, char *key, size_t klen) {
  if (v->n == v->cap) {
    v->cap = v->cap ? v->cap * 2 : 4;
    v->item = (jv **)realloc(v->item, v->cap * sizeof *v->item);
    if (!v->item) abort();
    if (v->type == 'o') {
      v->key = (char **)realloc(v->key, v->cap * sizeof *v->key);
      v->klen = (size_t *)realloc(v->klen, v->cap * sizeof *v->klen);
      if (!v->key || !v->klen) abort();
    }
  }
  v->item[v->n] = item;
  if (v->type == 'o') {
    v->key[v->n] = key;
    v->klen[v->n] = klen;
  }
  v->n++;
}

static jv *read_value(rd *r, int depth) {
  jv *v;
  ws(r);
  if (r->p >= r->e || depth > 64) return NULL;
  switch (*r->p) {
    case '{':
    case '[': {
      int obj = *r->p == '{';
      v = jv_new(obj ? 'o' : 'a');
      r->p++;
      ws(r);
      if (r->p < r->e && *r->p == (obj ? '}' : ']')) {
        r->p++;
        return v;
      }
      for (;;) {
        char *key = NULL;
        size_t klen = 0;
        jv *item;
        if (obj) {
          ws(r);
          if (r->p >= r->e || *r->p != '"' || !read_string(r, &key, &klen)) break;
          ws(r);
          if (r->p >= r->e || *r->p != ':') {
            free(key);
            break;
          }
          r->p++;
        }
        item = read_value(r, depth + 1);
        if (!item) {
          free(key);
          break;
        }
        push(v, item, key, klen);
        ws(r);
        if (r->p < r->e && *r->p == ',') {
          r->p++;
          continue;
        }
        if (r->p < r->e && *r->p == (obj ? '}' : ']')) {
          r->p++;
          return v;
        }
        break;
      }
      jv_free(v);
      return NULL;
    }
    case '"':
      v = jv_new('s');
      if (read_string(r, &v->s, &v->len)) return v;
      jv_free(v);
      return NULL;
    case 't':
    case 'f':
    case 'n': {
      const char *w = *r->p == 't' ? "true" : *r->p == 'f' ? "false" : "null";
      size_t n = strlen(w);
      if ((size_t)(r->e - r->p) < n || memcmp(r->p, w, n) != 0) return NULL;
      r->p += n;
      return jv_new(w[0] == 'n' ? 'n' : w[0]);
    }
    default:
      v = jv_new('d');
      if (read_number(r, v)) return v;
      jv_free(v);
      return NULL;
  }
}

/* The last member named k, as lua-cjson keeps it. */
static const jv *get(const jv *o, const char *k) {
  size_t i, n = strlen(k);
  const jv *found = NULL;
  for (i = 0; i < o->n; i++)
    if (o->klen[i] == n && memcmp(o->key[i], k, n) == 0) found = o->item[i];
  return found;
}

static int absent(const jv *v) {
  return v == NULL || v->type == 'n';
}

/* 1 and the content when data is a content-only chunk of choice 0. */
static int reference(const char *data, size_t len, unsigned known, const char **text,
                     size_t *text_len, jv **tree) {
  static const char *const captured[4] = {"id", "created", "model", "system_fingerprint"};
  static const char *const nulls[5] = {"role", "refusal", "reasoning", "reasoning_content",
                                       "tool_calls"};
  rd r;
  jv *top;
  const jv *choices, *ch, *index, *delta, *content;
  int i;
  r.p = (const unsigned char *)data;
  r.e = r.p + len;
  *tree = top = read_value(&r, 0);
  if (!top) return 0;
  ws(&r);
  if (r.p != r.e || top->type != 'o') return 0;
  if (!absent(get(top, "usage")) || !absent(get(top, "error"))) return 0;
  for (i = 0; i < 4; i++)
    if (!(known & (1u << i)) && !absent(get(top, captured[i]))) return 0;
  choices = get(top, "choices");
  if (!choices || choices->type != 'a' || choices->n != 1) return 0;
  ch = choices->item[0];
  if (ch->type != 'o') return 0;
  index = get(ch, "index");
  if (!index || index->type != 'd' || strtod(index->s, NULL) != 0.0) return 0;
  if (!absent(get(ch, "finish_reason")) || !absent(get(ch, "logprobs"))) return 0;
  delta = get(ch, "delta");
  if (!delta || delta->type != 'o') return 0;
  content = get(delta, "content");
  if (!content || content->type != 's') return 0;
  for (i = 0; i < 5; i++)
    if (!absent(get(delta, nulls[i]))) return 0;
  *text = content->s;
  *text_len = content->len;
  return 1;
}

/* ---- lua-cjson, when it loads ------------------------------------------ */

static const char CJSON_CHECK[] =
  "local ok, cjson = pcall(require, 'cjson')\n"
  "if not ok then return nil end\n"
  "cjson = cjson.new()\n"
  "cjson.decode_max_depth(128)\n"
  "local null = cjson.null\n"
  "local function absent(v) return v == nil or v == null end\n"
  "local bits = { id = 1, created = 2, model = 4, system_fingerprint = 8 }\n"
  "return function(data, known)\n"
  "  local ok, c = pcall(cjson.decode, data)\n"
  "  if not ok then return nil, 'cjson.decode failed: ' .. tostring(c) end\n"
  "  if type(c) ~= 'table' or not absent(c.usage) or not absent(c.error) then return nil, 'top' end\n"
  "  for k, b in pairs(bits) do\n"
  "    if known & b == 0 and not absent(c[k]) then return nil, k end\n"
  "  end\n"
  "  local chs = c.choices\n"
  "  if type(chs) ~= 'table' or chs[1] == nil or next(chs, next(chs)) ~= nil then return nil, 'choices' end\n"
  "  local ch = chs[1]\n"
  "  if type(ch) ~= 'table' or ch.index ~= 0 or not absent(ch.finish_reason) or not absent(ch.logprobs) then\n"
  "    return nil, 'choice'\n"
  "  end\n"
  "  local d = ch.delta\n"
  "  if type(d) ~= 'table' or type(d.content) ~= 'string' then return nil, 'delta' end\n"
  "  for _, k in ipairs{ 'role', 'refusal', 'reasoning', 'reasoning_content', 'tool_calls' } do\n"
  "    if not absent(d[k]) then return nil, k end\n"
  "  end\n"
  "  return d.content\n"
  "end\n";

static lua_State *LS;  /* holds the check function at index 1 */
static int lua_tried;

static void lua_init(void) {
  lua_tried = 1;
  LS = luaL_newstate();
  if (!LS) return;
  luaL_openlibs(LS);
  if (luaL_loadstring(LS, CJSON_CHECK) != LUA_OK || lua_pcall(LS, 0, 1, 0) != LUA_OK ||
      !lua_isfunction(LS, -1)) {
    fprintf(stderr, "fuzz_sse_chat: lua-cjson not available, checking against the C reference only\n");
    lua_close(LS);
    LS = NULL;
  }
}

static void cjson_check(const char *data, size_t len, unsigned known, const char *text,
                        size_t text_len) {
  const char *got;
  size_t got_len;
  if (!lua_tried) lua_init();
  if (!LS) return;
  lua_pushvalue(LS, 1);
  lua_pushlstring(LS, data, len);
  lua_pushinteger(LS, (lua_Integer)known);
  if (lua_pcall(LS, 2, 2, 0) != LUA_OK) die("the cjson check raised", data, len);
  got = lua_tolstring(LS, -2, &got_len);
  if (!got) die(lua_tostring(LS, -1), data, len);
  if (got_len != text_len || memcmp(got, text, text_len) != 0)
    die("cjson decodes another content", data, len);
  lua_settop(LS, 1);
  lua_gc(LS, LUA_GCCOLLECT, 0); /* keep the heap flat between inputs */
}

/* ---- generator mode: chunks built from the input's choices ------------- */

/* Each byte of the input picks one alternative at one decision point of a
 * small grammar of chat chunks (members in any order, duplicated or not,
 * nulls, wrong types, escapes, odd numbers, nested values), so most inputs
 * are chunks that are almost right.  When the bytes run out, objects get
 * no more members and every other choice takes its first alternative. */
typedef struct gen {
  const uint8_t *p, *e;
  char *b;
  size_t len, cap;
} gen;

static unsigned pick(gen *g, unsigned n) {
  return g->p < g->e ? *g->p++ % n : 0;
}

static void emit(gen *g, const char *s, size_t n) {
  if (n == 0) return;
  if (g->len + n > g->cap) {
    while (g->len + n > g->cap) g->cap = g->cap ? g->cap * 2 : 256;
    g->b = (char *)realloc(g->b, g->cap);
    if (!g->b) abort();
  }
  memcpy(g->b + g->len, s, n);
  g->len += n;
}

static void put(gen *g, const char *s) {
  emit(g, s, strlen(s));
}

static void gws(gen *g) {
  static const char *const w[] = {"", "", "", " ", "\n", "\t ", "\r\n"};
  put(g, w[pick(g, 7)]);
}

static void gstring(gen *g) {
  static const char *const piece[] = {
    "tok", " ", "a", "\\n", "\\\"", "\\\\", "\\/", "\\b", "\\f", "\\r", "\\t", "\\u00e9",
    "\\u20AC", "\\ud83d\\ude00", "\\u0000", "\xc3\xa9", "\xe2\x82\xac", "\xff", "\\ud800",
    "\\udc00", "\\ude00\\ud83d", "\x01", "\\x", "\\u12", "\t", "\""};
  unsigned n = pick(g, 6), i;
  put(g, "\"");
  for (i = 0; i < n; i++) {
    unsigned k = pick(g, 64);
    put(g, piece[k < 16 ? k : k < 48 ? k % 16 : k % (sizeof piece / sizeof piece[0])]);
  }
  put(g, "\"");
}

static void gvalue(gen *g, int depth) {
  static const char *const scalar[] = {
    "null", "0", "1", "-1.5e+10", "0.5", "true", "false", "1E5", "-0", "01", "1.", ".5",
    "+1", "0x10", "NaN", "tru", "nul", "-"};
  unsigned k = pick(g, depth > 40 ? 3 : 6), n, i;
  switch (k) {
    case 0:
    case 1: {
      unsigned j = pick(g, 32);
      put(g, scalar[j < 9 ? j : j < 24 ? j % 9 : j % (sizeof scalar / sizeof scalar[0])]);
      break;
    }
    case 2:
      gstring(g);
      break;
    case 3:
    case 4:
      put(g, k == 3 ? "[" : "{");
      n = pick(g, 4);
      for (i = 0; i < n; i++) {
        if (i) put(g, ",");
        gws(g);
        if (k == 4) {
          gstring(g);
          put(g, ":");
        }
        gvalue(g, depth + 1);
      }
      put(g, k == 3 ? "]" : "}");
      break;
    default: { /* deep nesting */
      unsigned d = pick(g, 64) + 1;
      for (i = 0; i < d; i++) put(g, "[");
      for (i = 0; i < d; i++) put(g, "]");
      break;
    }
  }
}

static void gdelta(gen *g) {
  static const char *const name[] = {
    "content", "content", "role", "refusal", "reasoning", "reasoning_content",
    "tool_calls", "annotations", "con\\u0074ent", "function_call"};
  unsigned n = pick(g, 4) + 1, i;
  put(g, "{");
  for (i = 0; i < n && (i == 0 || g->p < g->e); i++) {
    unsigned k = pick(g, 10);
    if (i) put(g, ",");
    gws(g);
    put(g, "\"");
    put(g, name[k]);
    put(g, "\":");
    gws(g);
    if (k <= 1) {
      if (pick(g, 8) == 7) gvalue(g, 3);
      else gstring(g);
    } else if (pick(g, 3) == 0) {
      gvalue(g, 3);
    } else {
      put(g, "null");
    }
  }
  gws(g);
  put(g, "}");
}

static void gchoice(gen *g) {
  static const char *const name[] = {
    "index", "delta", "finish_reason", "logprobs", "message", "error", "native", "delta"};
  static const char *const index[] = {"0", "0", "0", "1", "0.0", "-0", "\"0\"", "null", "00"};
  unsigned n = pick(g, 5) + 1, i;
  put(g, "{");
  for (i = 0; i < n && (i == 0 || g->p < g->e); i++) {
    unsigned k = pick(g, 8);
    if (i) put(g, ",");
    gws(g);
    put(g, "\"");
    put(g, name[k]);
    put(g, "\":");
    gws(g);
    if (k == 0) put(g, index[pick(g, 9)]);
    else if ((k == 1 || k == 7) && pick(g, 8) != 7) gdelta(g);
    else if (k == 2) put(g, pick(g, 3) ? "null" : "\"stop\"");
    else gvalue(g, 2);
  }
  put(g, "}");
}

static void gchunk(gen *g) {
  static const char *const name[] = {
    "choices", "choices", "id", "created", "model", "system_fingerprint", "usage", "error",
    "object", "obfuscation", "service_tier", "choices"};
  unsigned n = pick(g, 8) + 1, i, j, m;
  gws(g);
  put(g, "{");
  for (i = 0; i < n && (i == 0 || g->p < g->e); i++) {
    unsigned k = pick(g, 12);
    if (i) put(g, ",");
    gws(g);
    put(g, "\"");
    put(g, name[k]);
    put(g, "\":");
    gws(g);
    if (k == 0 || k == 1 || k == 11) {
      m = pick(g, 8);
      m = m < 6 ? 1 : m == 6 ? 0 : 2;
      put(g, "[");
      for (j = 0; j < m; j++) {
        if (j) put(g, ",");
        gchoice(g);
      }
      put(g, "]");
    } else if (k >= 6 && k <= 7) {
      if (pick(g, 3)) put(g, "null");
      else gvalue(g, 1);
    } else if (pick(g, 4) == 0) {
      put(g, "null");
    } else {
      gvalue(g, 1);
    }
  }
  gws(g);
  put(g, "}");
  gws(g);
  if (pick(g, 16) == 15) put(g, pick(g, 2) ? "x" : "{}");
}

/* ---- the harness -------------------------------------------------------- */

/* One chunk through the fast path with state ch; returns the verdict and
 * copies the content to *copy (malloc'd) when accepted. */
static int fast(slm_sse_chat *ch, const char *data, size_t len, unsigned known, char **copy,
                size_t *copy_len) {
  const char *text = NULL;
  size_t text_len = 0;
  char *buf = (char *)malloc(len ? len : 1); /* exact size: ASan sees overreads */
  int ok;
  if (!buf) abort();
  memcpy(buf, data, len);
  ok = slm_sse_chat_text(ch, buf, len, known, &text, &text_len);
  *copy = NULL;
  *copy_len = 0;
  if (ok) {
    *copy = (char *)malloc(text_len ? text_len : 1);
    if (!*copy) abort();
    memcpy(*copy, text, text_len);
    *copy_len = text_len;
  }
  free(buf);
  return ok;
}

static void check(slm_sse_chat *warm, const char *data, size_t len, unsigned known) {
  slm_sse_chat fresh;
  char *a, *b;
  size_t alen, blen;
  int oka, okb;
  memset(&fresh, 0, sizeof fresh);
  oka = fast(warm, data, len, known, &a, &alen);
  okb = fast(&fresh, data, len, known, &b, &blen);
  slm_sse_chat_free(&fresh);
  if (oka != okb) die(oka ? "accepted only with the cache" : "accepted only without the cache", data, len);
  if (oka && (alen != blen || memcmp(a, b, alen) != 0)) die("the cache changed the content", data, len);
  if (oka) {
    const char *text;
    size_t text_len;
    jv *tree = NULL;
    if (!reference(data, len, known, &text, &text_len, &tree))
      die("the fast path accepted what the reference refuses", data, len);
    if (text_len != alen || memcmp(text, a, alen) != 0)
      die("the fast path and the reference decode another content", data, len);
    jv_free(tree);
    cjson_check(data, len, known, a, alen);
  }
  free(a);
  free(b);
}

int LLVMFuzzerTestOneInput(const uint8_t *in, size_t size);

/* The chunk for input bytes in[0..n): TEMPLATE first when asked, then the
 * bytes themselves or the tokens they stand for.  Returns its length. */
static size_t build(char **out, const uint8_t *in, size_t n, unsigned mode) {
  size_t cap = sizeof TEMPLATE + n * ((mode & 4) ? 64 : 1), len = 0, i;
  char *b = (char *)malloc(cap);
  if (!b) abort();
  if (mode & 1) {
    memcpy(b, TEMPLATE, sizeof TEMPLATE - 1);
    len = sizeof TEMPLATE - 1;
  }
  for (i = 0; i < n; i++) {
    if (mode & 4) {
      const char *t = TOKENS[in[i] % NTOKENS];
      size_t tl = strlen(t);
      memcpy(b + len, t, tl);
      len += tl;
    } else {
      b[len++] = (char)in[i];
    }
  }
  *out = b;
  return len;
}

int LLVMFuzzerTestOneInput(const uint8_t *in, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *in, size_t size) {
  slm_sse_chat warm;
  unsigned known, mode, fewer;
  size_t split, n, l1, l2;
  char *c1, *c2;
  if (size < 2) return 0;
  known = in[0] & 15u;
  mode = (in[0] >> 4) & 7u;
  fewer = known & in[1] & 15u;
  n = size - 2;
  split = (mode & 2) ? (size_t)in[1] * n / 255 : n;
  in += 2;
  if (mode & 4 && mode & 1) { /* both token and template: generator mode */
    gen g1, g2;
    memset(&g1, 0, sizeof g1);
    memset(&g2, 0, sizeof g2);
    g1.p = in;
    g1.e = in + split;
    g2.p = in + split;
    g2.e = in + n;
    gchunk(&g1);
    gchunk(&g2);
    c1 = g1.b;
    l1 = g1.len;
    c2 = g2.b;
    l2 = g2.len;
  } else {
    l1 = build(&c1, in, split, mode);
    l2 = build(&c2, in + split, n - split, mode);
  }
  memset(&warm, 0, sizeof warm);
  check(&warm, c1, l1, known);
  if (mode & 2) {
    check(&warm, c2, l2, known);
    check(&warm, c2, l2, fewer); /* maybe fewer known bits than the cache had */
  }
  slm_sse_chat_free(&warm);
  free(c1);
  free(c2);
  return 0;
}
