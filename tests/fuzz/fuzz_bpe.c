/*
 * fuzz_bpe.c - libFuzzer harness for the pre-tokenizers (csrc/pretok.c) and
 * byte-level BPE (csrc/bpe.c), through the same Lua binding users call.
 *
 * Vocabularies: o200k_base and cl100k_base from $SLM_FUZZ_VOCAB_DIR, else
 * lua/slm/data relative to the working directory (run from the repository
 * root, as tests/fuzz/run.sh does).
 *
 * Input layout: byte 0 picks the encoding and pre-tokenizer, byte 1 the
 * token limit for truncate/chunks, the rest is the text (any bytes).
 * Checked: every pre-tokenizer tiles the input with non-empty pieces, the
 * same with and without its ASCII fast path and one at a time or batched;
 * decode(encode(x)) == x, with and without special tokens allowed; the
 * packed encoding (an slm.IdList) holds the same ids and decodes the same,
 * and its bytes() are those ids, 4 little-endian bytes each; merging
 * every piece on the heap gives the same ids as the array scan;
 * count(x) == #encode(x); truncate gives a prefix within the limit; chunks
 * are substrings at increasing offsets that cover x.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "slm.h"
#include "pretok.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static lua_State *L;
static int ref_tok[2] = { LUA_NOREF, LUA_NOREF };

static void die(const char *what) {
  fprintf(stderr, "fuzz_bpe: invariant broken: %s\n", what);
  abort();
}

static void load(int slot, const char *dir, const char *file, const char *kind,
                 const char *special, int special_id) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s", dir, file);
  lua_getfield(L, 1, "bpe_load");
  lua_pushstring(L, path);
  lua_pushstring(L, kind);
  lua_newtable(L);
  lua_pushinteger(L, special_id);
  lua_setfield(L, -2, special);
  if (lua_pcall(L, 3, 2, 0) != LUA_OK || lua_isnil(L, -2)) {
    fprintf(stderr, "fuzz_bpe: cannot load %s: %s (set SLM_FUZZ_VOCAB_DIR)\n", path,
            lua_tostring(L, -1));
    exit(1);
  }
  lua_pop(L, 1);
  ref_tok[slot] = luaL_ref(L, LUA_REGISTRYINDEX);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  const char *dir = getenv("SLM_FUZZ_VOCAB_DIR");
  (void)argc;
  (void)argv;
  if (!dir) dir = "lua/slm/data";
  L = luaL_newstate();
  luaL_openlibs(L);
  lua_newtable(L); /* stands in for the slm.core module table, at index 1 */
  slm_open_bpe(L);
  slm_open_idlist(L);
  load(0, dir, "o200k_base.tiktoken", "o200k", "<|endoftext|>", 199999);
  load(1, dir, "cl100k_base.tiktoken", "cl100k", "<|endoftext|>", 100257);
  return 0;
}

static void set_threshold(lua_State *l, int n) {
  lua_getfield(l, 1, "_heap_threshold");
  lua_pushvalue(l, 1);
  lua_pushinteger(l, n);
  lua_call(l, 2, 0);
}

/* tok:decode(ids at stack index i) must give back s[0, len). */
static void check_decode(lua_State *l, int i, const char *s, size_t len, const char *what) {
  size_t plen;
  const char *p;
  lua_getfield(l, 1, "decode");
  lua_pushvalue(l, 1);
  lua_pushvalue(l, i);
  lua_call(l, 2, 1);
  p = lua_tolstring(l, -1, &plen);
  if (plen != len || memcmp(p, s, len) != 0) die(what);
  lua_pop(l, 1);
}

/* Runs on the Lua stack: tok at 1, text at 2, limit at 3. */
static int check(lua_State *l) {
  size_t len, n, i, covered = 0, prev = 0, plen;
  const char *s = lua_tolstring(l, 2, &len);
  lua_Integer limit = lua_tointeger(l, 3);
  const char *p;

  /* encode / decode / count */
  lua_getfield(l, 1, "encode");
  lua_pushvalue(l, 1);
  lua_pushvalue(l, 2);
  lua_call(l, 2, 1); /* ids at 4 */
  n = (size_t)lua_rawlen(l, 4);
  check_decode(l, 4, s, len, "decode(encode(x)) ~= x");
  lua_getfield(l, 1, "count");
  lua_pushvalue(l, 1);
  lua_pushvalue(l, 2);
  lua_call(l, 2, 1);
  if ((size_t)lua_tointeger(l, -1) != n) die("count(x) ~= #encode(x)");
  lua_pop(l, 1);

  /* packed: the same ids, the same bytes back */
  lua_getfield(l, 1, "encode");
  lua_pushvalue(l, 1);
  lua_pushvalue(l, 2);
  lua_pushnil(l);
  lua_pushboolean(l, 1);
  lua_call(l, 4, 1); /* packed at 5 */
  {
    size_t pn = 0, bl;
    const uint32_t *v = slm_to_idlist(l, 5, &pn);
    const unsigned char *bytes;
    if (!v || pn != n) die("packed encode: not an slm.IdList of #encode(x) ids");
    for (i = 0; i < n; i++) {
      slm_rawgeti(l, 4, i + 1);
      if ((lua_Integer)v[i] != lua_tointeger(l, -1)) die("packed and plain encode differ");
      lua_pop(l, 1);
    }
    lua_getfield(l, 5, "bytes");
    lua_pushvalue(l, 5);
    lua_call(l, 1, 1);
    bytes = (const unsigned char *)lua_tolstring(l, -1, &bl);
    if (bl != 4 * n) die("bytes() length");
    for (i = 0; i < n; i++)
      if (((uint32_t)bytes[4 * i] | (uint32_t)bytes[4 * i + 1] << 8 |
           (uint32_t)bytes[4 * i + 2] << 16 | (uint32_t)bytes[4 * i + 3] << 24) != v[i])
        die("bytes() is not the ids, little-endian");
    lua_pop(l, 1);
  }
  check_decode(l, 5, s, len, "decode(packed encode(x)) ~= x");
  lua_pop(l, 1);

  /* the heap merge agrees with the array scan */
  set_threshold(l, 1);
  lua_getfield(l, 1, "encode");
  lua_pushvalue(l, 1);
  lua_pushvalue(l, 2);
  lua_call(l, 2, 1);
  set_threshold(l, 48);
  if ((size_t)lua_rawlen(l, -1) != n) die("heap and scan differ (count)");
  for (i = 1; i <= n; i++) {
    lua_Integer a, c;
    slm_rawgeti(l, -1, i);
    slm_rawgeti(l, -3, i);
    a = lua_tointeger(l, -1);
    c = lua_tointeger(l, -2);
    lua_pop(l, 2);
    if (a != c) die("heap and scan differ");
  }
  lua_pop(l, 2);

  /* with every special token allowed */
  lua_getfield(l, 1, "encode");
  lua_pushvalue(l, 1);
  lua_pushvalue(l, 2);
  lua_pushliteral(l, "all");
  lua_call(l, 3, 1);
  check_decode(l, lua_gettop(l), s, len, "decode(encode(x, all)) ~= x");
  lua_pop(l, 1);

  /* truncate */
  lua_getfield(l, 1, "truncate");
  lua_pushvalue(l, 1);
  lua_pushvalue(l, 2);
  lua_pushinteger(l, limit);
  lua_call(l, 3, 1);
  p = lua_tolstring(l, -1, &plen);
  if (plen > len || memcmp(p, s, plen) != 0) die("truncate is not a prefix");
  if (plen < len && slm_utf8_floor((const unsigned char *)s, len, plen) != plen)
    die("truncate splits a character");
  lua_getfield(l, 1, "count");
  lua_pushvalue(l, 1);
  lua_pushvalue(l, -3);
  lua_call(l, 2, 1);
  if (lua_tointeger(l, -1) > limit) die("truncate exceeds the limit");
  lua_pop(l, 2);

  /* chunks */
  if (limit >= 1) {
    lua_getfield(l, 1, "chunks");
    lua_pushvalue(l, 1);
    lua_pushvalue(l, 2);
    lua_pushinteger(l, limit);
    lua_pushinteger(l, limit / 3);
    lua_call(l, 4, 2); /* parts at -2, starts at -1 */
    n = (size_t)lua_rawlen(l, -2);
    if (len > 0 && n == 0) die("no chunks");
    for (i = 1; i <= n; i++) {
      size_t at;
      slm_rawgeti(l, -2, i);
      p = lua_tolstring(l, -1, &plen);
      slm_rawgeti(l, -2, i);
      at = (size_t)lua_tointeger(l, -1) - 1;
      lua_pop(l, 2);
      if (at > covered || (i > 1 && at <= prev)) die("chunks leave a gap or go back");
      if (at + plen > len || memcmp(s + at, p, plen) != 0) die("chunk is not a substring");
      if (at + plen > covered) covered = at + plen;
      prev = at;
    }
    if (covered != len) die("chunks do not cover the text");
    lua_pop(l, 2);
  }
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const unsigned char *s;
  size_t len, pos, batch[7], nb, at;
  int which, kind, general;
  if (size < 2) return 0;
  which = data[0] % 3; /* 0: o200k, 1: cl100k, 2: cl100k vocab + llama3 rules */
  kind = which == 0 ? SLM_PRETOK_O200K : which == 1 ? SLM_PRETOK_CL100K : SLM_PRETOK_LLAMA3;
  s = data + 2;
  len = size - 2;

  /* every pre-tokenizer tiles the input, its ASCII fast path agrees with
   * the general matcher, and the batch splitter with both */
  general = kind == SLM_PRETOK_O200K ? SLM_PRETOK_O200K_GENERAL : SLM_PRETOK_CL100K_GENERAL;
  for (pos = 0, nb = 0, at = 0; pos < len;) {
    size_t e = slm_pretok_next(kind, s, len, pos);
    if (e <= pos || e > len) die("pre-tokenizer piece out of range");
    if (slm_pretok_next(general, s, len, pos) != e) die("fast path and general matcher differ");
    if (at == nb) {
      nb = slm_pretok_split(kind, s, len, pos, batch, sizeof batch / sizeof batch[0]);
      at = 0;
      if (nb == 0) die("split stopped early");
    }
    if (batch[at++] != e) die("split and next differ");
    pos = e;
  }
  if (at != nb || slm_pretok_split(kind, s, len, len, batch, 1) != 0) die("split went past the end");
  for (pos = 0; pos <= len; pos++) {
    size_t f = slm_utf8_floor(s, len, pos);
    if (f > pos || (pos < len && f + slm_utf8_len(s, len, f) <= pos && f != pos))
      die("utf8_floor");
  }

  lua_settop(L, 1);
  lua_pushcfunction(L, check);
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref_tok[which == 0 ? 0 : 1]);
  lua_pushlstring(L, (const char *)s, len);
  lua_pushinteger(L, data[1] % 64);
  if (lua_pcall(L, 3, 0, 0) != LUA_OK) {
    fprintf(stderr, "fuzz_bpe: Lua error: %s\n", lua_tostring(L, -1));
    abort();
  }
  return 0;
}
