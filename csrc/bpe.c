/*
 * bpe.c - byte-level BPE with tiktoken's semantics, and its Lua binding
 * (userdata "slm.BPE", created by slm.core.bpe_new).
 *
 * Owns: the vocabulary (byte strings <-> ranks, loaded from a tiktoken file
 * or a Lua table), special tokens, and encode / count / decode / truncate /
 * chunks.  Pre-tokenization is pretok.c's.
 *
 * Merging follows tiktoken: a piece that is itself a token is that token;
 * otherwise start from single bytes and repeatedly merge the adjacent pair
 * whose concatenation has the lowest rank (leftmost on ties) until no pair
 * is a token.  Short pieces use tiktoken's array scan; long ones a min-heap
 * keyed on (rank, start) with lazy deletion, which picks exactly the same
 * pair at each step in O(log n).
 *
 * Memory: the vocabulary and all scratch buffers hang off the userdata and
 * are freed by its __gc (also :close()), so a Lua error raised halfway
 * through an encode leaks nothing.
 */
#define _POSIX_C_SOURCE 200809L
#include "slm.h"
#include "pretok.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define BPE_MT "slm.BPE"
#define NONE UINT32_MAX
#define DEAD (UINT32_MAX - 1)
#define SMALL_PIECE 48    /* array scan up to this many bytes, heap above */
#define MAX_RANK 0x1000000u /* 16M: far above any real vocabulary */

/* A hash slot keeps enough of its token to recognise it without reading
 * the token's bytes for tokens of up to 8 bytes (most lookups): the 64-bit
 * key of its last 8 bytes, which is the whole token when it is shorter
 * (see hash_bytes), and the length. */
typedef struct {
  uint32_t taglen; /* high hash bits | min(len, 255) */
  uint32_t rank;   /* NONE: empty slot */
  uint64_t key;
} slot_t;

typedef struct {
  uint32_t id;
  uint32_t len;
  char *text;
} special_t;

/* Piece cache: merging a piece that is not itself a token costs a dozen
 * lookups; text repeats its words, so the result is kept, direct-mapped by
 * the piece's hash and checked against the piece's bytes. */
#define CACHE_SIZE 8192
#define CACHE_BYTES 24
#define CACHE_TOKENS 12
typedef struct {
  uint8_t len, ntok; /* len 0: empty */
  uint8_t end[CACHE_TOKENS];
  unsigned char bytes[CACHE_BYTES];
  uint32_t tok[CACHE_TOKENS];
} cache_t;

/* Hot pieces: most pieces of most text are short, and a few thousand
 * distinct ones make up most of it.  A piece of up to 8 bytes is looked up
 * here first, by its bytes as one 64-bit word: a hit gives its tokens
 * without hashing, probing the vocabulary table (megabytes, mostly not in
 * the CPU caches) or merging.  Direct-mapped, HOT_SIZE * 32 bytes (small
 * enough to stay in a core's own cache), allocated on first use. */
#define HOT_BITS 12
#define HOT_SIZE (1u << HOT_BITS)
#define HOT_BYTES 8
#define HOT_TOKENS 4
typedef struct {
  uint64_t key; /* the piece's bytes, zero-extended (see short_key) */
  uint8_t len;  /* 0: empty */
  uint8_t ntok;
  uint8_t end[HOT_TOKENS]; /* token k ends at byte end[k] of the piece */
  uint32_t tok[HOT_TOKENS];
} hot_t;

typedef struct {
  unsigned char *blob; /* bytes of every token, back to back */
  size_t blob_len;
  uint32_t *off, *len; /* by rank; len 0: no token with that rank */
  uint32_t nranks;     /* max rank + 1 */
  uint32_t rank_cap;   /* entries allocated in off and len */
  uint32_t ntokens;
  slot_t *tab;
  uint32_t mask;
  uint32_t byte_rank[256];
  int kind;
  special_t *sp;
  size_t nsp;
  /* scratch, reused between calls */
  uint32_t *ids, *ends;
  size_t ids_cap, ends_cap;
  unsigned char *work;
  size_t work_cap;
  unsigned char *allow; /* one flag per special */
  unsigned char first[256]; /* first bytes of the allowed specials */
  cache_t *cache;           /* allocated on first use */
  hot_t *hot;               /* allocated on first use */
  size_t small_max;         /* array scan up to this piece length, heap above */
  int closed;
} bpe_t;

/* ---------------------------------------------------------------- hashing */

static inline uint64_t mix64(uint64_t h) {
  h ^= h >> 32;
  h *= 0xD6E8FEB86659FD93ull;
  h ^= h >> 32;
  return h;
}

/* p[0, n) for n <= 8 as a 64-bit word: its bytes, zero-extended.  `avail`
 * >= n is how many bytes may be read from p: with 8 of them this is one
 * 8-byte load and a mask, without a branch on the length (pieces' lengths
 * are as good as random, and such branches are mispredicted often); near
 * the end of a buffer the bytes are copied one by one.  Same word either
 * way. */
static inline uint64_t short_key(const unsigned char *p, size_t n, size_t avail) {
  uint64_t v = 0;
  (void)avail; /* unused on big-endian machines */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  if (avail >= 8 && n > 0) {
    memcpy(&v, p, 8);
    return v & (~0ull >> (64 - 8 * n));
  }
#endif
  memcpy(&v, p, n);
  return v;
}

/* Hash of p[0, n) and, in *key, an exact encoding of its last 8 bytes
 * (short_key of the whole string when n <= 8: with the length in the slot,
 * that identifies it).  `avail` as for short_key. */
static inline uint64_t hash_bytes(const unsigned char *p, size_t n, size_t avail,
                                  uint64_t *key) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ ((uint64_t)n * 0xC2B2AE3D27D4EB4Full);
  uint64_t v;
  if (n <= 8) {
    v = short_key(p, n, avail);
  } else {
    size_t k = n;
    while (k > 8) {
      memcpy(&v, p, 8);
      h = (h ^ v) * 0xBF58476D1CE4E5B9ull;
      h ^= h >> 31;
      p += 8;
      k -= 8;
    }
    memcpy(&v, p + k - 8, 8); /* the last 8 bytes, overlapping the previous block */
  }
  *key = v;
  return mix64((h ^ v) * 0x94D049BB133111EBull);
}

static inline uint32_t taglen_of(uint64_t h, size_t n) {
  return ((uint32_t)(h >> 32) & ~0xFFu) | (uint32_t)(n < 255 ? n : 255);
}

/* Rank of the token p[0, n), or NONE; `avail` as for hash_bytes. */
static inline uint32_t lookup(const bpe_t *b, const unsigned char *p, size_t n,
                              size_t avail) {
  uint64_t key, h = hash_bytes(p, n, avail, &key);
  uint32_t tl = taglen_of(h, n);
  uint32_t i = (uint32_t)h & b->mask;
  for (;;) {
    const slot_t *s = &b->tab[i];
    if (s->rank == NONE) return NONE;
    if (s->taglen == tl && s->key == key &&
        (n <= 8 || (b->len[s->rank] == n && memcmp(b->blob + b->off[s->rank], p, n) == 0)))
      return s->rank;
    i = (i + 1) & b->mask;
  }
}

/* ------------------------------------------------------------- allocation */

static void bpe_free(bpe_t *b) {
  size_t i;
  free(b->blob); free(b->off); free(b->len); free(b->tab);
  for (i = 0; i < b->nsp; i++) free(b->sp[i].text);
  free(b->sp); free(b->ids); free(b->ends); free(b->work); free(b->allow);
  free(b->cache); free(b->hot);
  memset(b, 0, sizeof *b);
  b->closed = 1;
}

static void *xrealloc(lua_State *L, void *p, size_t n) {
  void *q = realloc(p, n ? n : 1);
  if (!q) luaL_error(L, "slm.BPE: out of memory");
  return q;
}

/* Room for `need` entries in the scratch array *a (capacity *cap). */
static void ensure_cap(lua_State *L, uint32_t **a, size_t *cap, size_t need) {
  size_t c;
  if (need <= *cap) return;
  c = *cap ? *cap : 1024;
  while (c < need) c *= 2;
  *a = xrealloc(L, *a, c * sizeof **a);
  *cap = c;
}

static void ensure_work(lua_State *L, bpe_t *b, size_t bytes) {
  if (bytes <= b->work_cap) return;
  b->work = xrealloc(L, b->work, bytes);
  b->work_cap = bytes;
}

/* --------------------------------------------------------------- building */

/* Insert the token of rank r (its bytes already in blob); 0 if the same
 * bytes are already there. */
static int tab_insert(bpe_t *b, uint32_t r) {
  const unsigned char *p = b->blob + b->off[r];
  size_t n = b->len[r];
  uint64_t key, h = hash_bytes(p, n, b->blob_len - b->off[r], &key);
  uint32_t tl = taglen_of(h, n);
  uint32_t i = (uint32_t)h & b->mask;
  for (;;) {
    slot_t *s = &b->tab[i];
    if (s->rank == NONE) {
      s->taglen = tl; s->key = key; s->rank = r;
      return 1;
    }
    if (s->taglen == tl && s->key == key && b->len[s->rank] == n &&
        memcmp(b->blob + b->off[s->rank], p, n) == 0)
      return 0;
    i = (i + 1) & b->mask;
  }
}

/* Grow the rank arrays to hold rank r. */
static void ensure_rank(lua_State *L, bpe_t *b, uint32_t r, uint32_t *cap) {
  uint32_t c = *cap ? *cap : 1024, old = *cap;
  if (r < old) return;
  while (c <= r) c *= 2;
  b->off = xrealloc(L, b->off, (size_t)c * sizeof *b->off);
  b->len = xrealloc(L, b->len, (size_t)c * sizeof *b->len);
  memset(b->len + old, 0, (size_t)(c - old) * sizeof *b->len);
  *cap = c;
  b->rank_cap = c;
}

static void add_token(lua_State *L, bpe_t *b, uint32_t r, uint32_t off,
                      uint32_t len, uint32_t *cap) {
  ensure_rank(L, b, r, cap);
  if (len == 0) luaL_error(L, "slm.BPE: empty token (rank %d)", (int)r);
  if (b->len[r]) luaL_error(L, "slm.BPE: rank %d appears twice", (int)r);
  b->off[r] = off;
  b->len[r] = len;
  if (r >= b->nranks) b->nranks = r + 1;
  b->ntokens++;
}

/* Once every token is in blob and off/len: the hash table. */
static void build_index(lua_State *L, bpe_t *b) {
  size_t i, size = 16;
  uint32_t r;
  while (size < (size_t)b->ntokens * 2 + 2) size *= 2;
  b->tab = xrealloc(L, NULL, size * sizeof *b->tab);
  b->mask = (uint32_t)(size - 1);
  for (i = 0; i < size; i++) b->tab[i].rank = NONE;
  /* slots are prefetched PF ranks ahead: the inserts are random accesses
   * into a table larger than the caches */
#define PF 16
  for (r = 0; r < b->nranks + PF; r++) {
    if (r < b->nranks && b->len[r]) {
#if defined(__GNUC__)
      uint64_t key, h = hash_bytes(b->blob + b->off[r], b->len[r],
                                   b->blob_len - b->off[r], &key);
      __builtin_prefetch(&b->tab[(uint32_t)h & b->mask], 1);
#endif
    }
    if (r >= PF) {
      uint32_t q = r - PF;
      if (b->len[q] && !tab_insert(b, q))
        luaL_error(L, "slm.BPE: token of rank %d appears twice", (int)q);
    }
  }
#undef PF
  for (i = 0; i < 256; i++) {
    unsigned char c = (unsigned char)i;
    b->byte_rank[i] = lookup(b, &c, 1, 1);
    if (b->byte_rank[i] == NONE)
      luaL_error(L, "slm.BPE: vocabulary has no token for byte %d", (int)i);
  }
}

/* tiktoken file: one "base64 rank" per line. */
static void load_tiktoken(lua_State *L, bpe_t *b, const unsigned char *s, size_t n) {
  size_t pos = 0, blob = 0, line = 0, lines = 1;
  uint32_t cap = 0;
  const unsigned char *q = s, *end = s + n;
  while ((q = memchr(q, '\n', (size_t)(end - q))) != NULL) { lines++; q++; }
  ensure_rank(L, b, (uint32_t)(lines < MAX_RANK ? lines : MAX_RANK), &cap);
  b->blob = xrealloc(L, NULL, n / 4 * 3 + 4);
  while (pos < n) {
    const unsigned char *nl = memchr(s + pos, '\n', n - pos);
    size_t e = nl ? (size_t)(nl - s) : n, j = e, sp;
    uint32_t r = 0, mul = 1;
    long k;
    line++;
    if (j > pos && s[j - 1] == '\r') j--;
    if (j > pos) {
      sp = j;
      while (sp > pos && s[sp - 1] != ' ') sp--;
      if (sp == pos || sp == j || j - sp > 8)
        luaL_error(L, "slm.BPE: bad tiktoken line %d", (int)line);
      for (k = (long)j - 1; k >= (long)sp; k--) {
        if (s[k] < '0' || s[k] > '9') luaL_error(L, "slm.BPE: bad rank on line %d", (int)line);
        r += (uint32_t)(s[k] - '0') * mul;
        mul *= 10;
      }
      if (r >= MAX_RANK) luaL_error(L, "slm.BPE: rank too large on line %d", (int)line);
      k = slm_base64_decode(s + pos, sp - 1 - pos, b->blob + blob, 0);
      if (k < 0) luaL_error(L, "slm.BPE: bad base64 on line %d", (int)line);
      add_token(L, b, r, (uint32_t)blob, (uint32_t)k, &cap);
      blob += (size_t)k;
    }
    pos = e + 1;
  }
  b->blob_len = blob;
  b->blob = xrealloc(L, b->blob, blob + 1); /* give back the base64 slack */
  build_index(L, b);
}

static int parse_mapped(lua_State *L) {
  bpe_t *b = (bpe_t *)lua_touserdata(L, 1);
  load_tiktoken(L, b, (const unsigned char *)lua_touserdata(L, 2),
                (size_t)lua_tointeger(L, 3));
  return 0;
}

/* Lua table { [bytes] = rank }. */
static void load_table(lua_State *L, bpe_t *b, int t) {
  size_t blob = 0;
  uint32_t cap = 0;
  lua_pushnil(L);
  while (lua_next(L, t)) {
    size_t l;
    lua_Integer r;
    if (lua_type(L, -2) != LUA_TSTRING || !lua_isnumber(L, -1))
      luaL_error(L, "slm.BPE: ranks table must map byte strings to integers");
    lua_tolstring(L, -2, &l);
    r = lua_tointeger(L, -1);
    if (r < 0 || r >= (lua_Integer)MAX_RANK) luaL_error(L, "slm.BPE: rank out of range");
    blob += l;
    lua_pop(L, 1);
  }
  if (blob >= UINT32_MAX) luaL_error(L, "slm.BPE: vocabulary too large");
  b->blob = xrealloc(L, NULL, blob + 1);
  b->blob_len = blob;
  blob = 0;
  lua_pushnil(L);
  while (lua_next(L, t)) {
    size_t l;
    const char *k = lua_tolstring(L, -2, &l);
    if (blob + l > b->blob_len) luaL_error(L, "slm.BPE: ranks table changed while loading");
    memcpy(b->blob + blob, k, l);
    add_token(L, b, (uint32_t)lua_tointeger(L, -1), (uint32_t)blob, (uint32_t)l, &cap);
    blob += l;
    lua_pop(L, 1);
  }
  build_index(L, b);
}

/* Lua table { [text] = id }. */
static void load_specials(lua_State *L, bpe_t *b, int t) {
  size_t n = 0;
  lua_pushnil(L);
  while (lua_next(L, t)) { n++; lua_pop(L, 1); }
  b->sp = xrealloc(L, NULL, (n + 1) * sizeof *b->sp);
  b->allow = xrealloc(L, NULL, n + 1);
  lua_pushnil(L);
  while (lua_next(L, t)) {
    size_t l;
    const char *k;
    lua_Integer id;
    special_t *sp;
    if (lua_type(L, -2) != LUA_TSTRING || !lua_isnumber(L, -1))
      luaL_error(L, "slm.BPE: specials table must map strings to integers");
    k = lua_tolstring(L, -2, &l);
    id = lua_tointeger(L, -1);
    if (l == 0 || id < 0 || id > (lua_Integer)UINT32_MAX - 2)
      luaL_error(L, "slm.BPE: bad special token");
    if ((uint64_t)id < b->nranks && b->len[id])
      luaL_error(L, "slm.BPE: special token id %d is also a rank", (int)id);
    if (b->nsp >= n) luaL_error(L, "slm.BPE: specials table changed while loading");
    sp = &b->sp[b->nsp];
    sp->text = xrealloc(L, NULL, l);
    b->nsp++; /* counted once its text is allocated, so bpe_free frees it */
    memcpy(sp->text, k, l);
    sp->len = (uint32_t)l;
    sp->id = (uint32_t)id;
    lua_pop(L, 1);
  }
}

/* ---------------------------------------------------------------- merging */

typedef struct {
  lua_State *L;
  bpe_t *b;
  int store; /* 0: count only, 1: ids in b->ids, 2: also ends in b->ends */
  size_t n;  /* tokens so far */
} sink_t;

static inline void emit(sink_t *o, uint32_t id, size_t end) {
  bpe_t *b = o->b;
  if (o->store) {
    if (o->n >= b->ids_cap) ensure_cap(o->L, &b->ids, &b->ids_cap, o->n + 1);
    b->ids[o->n] = id;
    if (o->store > 1) { /* only truncate and chunks need the ends */
      if (o->n >= b->ends_cap) ensure_cap(o->L, &b->ends, &b->ends_cap, o->n + 1);
      b->ends[o->n] = (uint32_t)end;
    }
  }
  o->n++;
}

/* tiktoken's scan, for short pieces (2 <= n <= SMALL_PIECE): the tokens
 * into tk[0, m), token k covering p[st[k], st[k + 1]); returns m. */
static size_t merge_small(const bpe_t *b, const unsigned char *p, size_t n,
                          uint32_t *st, uint32_t *tk) {
  uint32_t rk[SMALL_PIECE];
  size_t m = n, i;
  for (i = 0; i < n; i++) {
    st[i] = (uint32_t)i;
    tk[i] = b->byte_rank[p[i]];
  }
  st[n] = (uint32_t)n;
  for (i = 0; i + 1 < n; i++) rk[i] = lookup(b, p + i, 2, n - i);
  rk[n - 1] = NONE;
  for (;;) {
    uint32_t min = NONE;
    size_t best = 0;
    for (i = 0; i + 1 < m; i++)
      if (rk[i] < min) { min = rk[i]; best = i; }
    if (min == NONE) break;
    tk[best] = min;
    memmove(&st[best + 1], &st[best + 2], (m - best - 1) * sizeof st[0]);
    memmove(&tk[best + 1], &tk[best + 2], (m - best - 2) * sizeof tk[0]);
    memmove(&rk[best + 1], &rk[best + 2], (m - best - 2) * sizeof rk[0]);
    m--;
    rk[best] = best + 1 < m ? lookup(b, p + st[best], st[best + 2] - st[best], n - st[best])
                            : NONE;
    if (best > 0)
      rk[best - 1] = lookup(b, p + st[best - 1], st[best + 1] - st[best - 1], n - st[best - 1]);
  }
  return m;
}

static void heap_down(uint64_t *h, size_t n, size_t i) {
  uint64_t v = h[i];
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= n) break;
    if (c + 1 < n && h[c + 1] < h[c]) c++;
    if (h[c] >= v) break;
    h[i] = h[c];
    i = c;
  }
  h[i] = v;
}

static void heap_push(uint64_t *h, size_t *n, uint64_t v) {
  size_t i = (*n)++;
  while (i > 0) {
    size_t parent = (i - 1) / 2;
    if (h[parent] <= v) break;
    h[i] = h[parent];
    i = parent;
  }
  h[i] = v;
}

/* Same merges as merge_small, with a heap of (rank << 32 | start): the
 * smallest key is the lowest rank, leftmost on ties.  Stale entries (a node
 * merged away or whose pair changed) are skipped when popped: a node's pair
 * only changes by growing, which changes its rank, so "pair rank still
 * equals the entry's rank" is an exact validity test. */
static void merge_heap(sink_t *o, const unsigned char *p, size_t n, size_t base) {
  bpe_t *b = o->b;
  uint32_t *nxt, *prv, *prk, *tk;
  uint64_t *heap;
  size_t hn = 0, i;
  ensure_work(o->L, b, n * 3 * sizeof(uint64_t) + n * 4 * sizeof(uint32_t));
  heap = (uint64_t *)b->work;
  nxt = (uint32_t *)(heap + 3 * n);
  prv = nxt + n;
  prk = prv + n;
  tk = prk + n;
  for (i = 0; i < n; i++) {
    nxt[i] = (uint32_t)(i + 1);
    prv[i] = i ? (uint32_t)(i - 1) : NONE;
    tk[i] = b->byte_rank[p[i]];
    prk[i] = i + 1 < n ? lookup(b, p + i, 2, n - i) : NONE;
    if (prk[i] != NONE) heap[hn++] = ((uint64_t)prk[i] << 32) | i;
  }
  for (i = hn / 2; i-- > 0;) heap_down(heap, hn, i);
  while (hn > 0) {
    uint64_t top = heap[0];
    uint32_t r = (uint32_t)(top >> 32), s = (uint32_t)top, t, k;
    heap[0] = heap[--hn];
    if (hn) heap_down(heap, hn, 0);
    if (tk[s] == DEAD || prk[s] != r) continue;
    t = nxt[s];
    tk[s] = r;
    tk[t] = DEAD;
    nxt[s] = nxt[t];
    if (nxt[t] < n) prv[nxt[t]] = s;
    k = nxt[s];
    prk[s] = k < n ? lookup(b, p + s, nxt[k] - s, n - s) : NONE;
    if (prk[s] != NONE) heap_push(heap, &hn, ((uint64_t)prk[s] << 32) | s);
    if (prv[s] != NONE) {
      uint32_t h = prv[s];
      prk[h] = lookup(b, p + h, nxt[s] - h, n - h);
      if (prk[h] != NONE) heap_push(heap, &hn, ((uint64_t)prk[h] << 32) | h);
    }
  }
  for (i = 0; i < n; i = nxt[i]) emit(o, tk[i], base + nxt[i]);
}

/* Whole-piece lookup given its hash and key (see hash_bytes). */
static inline uint32_t lookup_hk(const bpe_t *b, const unsigned char *p, size_t n,
                                 uint64_t h, uint64_t key) {
  uint32_t tl = taglen_of(h, n);
  uint32_t i = (uint32_t)h & b->mask;
  for (;;) {
    const slot_t *s = &b->tab[i];
    if (s->rank == NONE) return NONE;
    if (s->taglen == tl && s->key == key &&
        (n <= 8 || (b->len[s->rank] == n && memcmp(b->blob + b->off[s->rank], p, n) == 0)))
      return s->rank;
    i = (i + 1) & b->mask;
  }
}

/* Tokens of one piece p[0, n) at offset base, too long for the hot table
 * (so n >= 2); `avail` as for short_key. */
static void encode_piece(sink_t *o, const unsigned char *p, size_t n, size_t base,
                         size_t avail) {
  bpe_t *b = o->b;
  uint32_t r, st[SMALL_PIECE + 1], tk[SMALL_PIECE];
  uint64_t key, h;
  size_t m, k;
  cache_t *c = NULL;
  h = hash_bytes(p, n, avail, &key);
  r = lookup_hk(b, p, n, h, key);
  if (r != NONE) { emit(o, r, base + n); return; }
  if (n > b->small_max) { merge_heap(o, p, n, base); return; }
  if (n <= CACHE_BYTES) {
    if (!b->cache) {
      b->cache = calloc(CACHE_SIZE, sizeof *b->cache);
      if (!b->cache) luaL_error(o->L, "slm.BPE: out of memory");
    }
    c = &b->cache[(h >> 20) & (CACHE_SIZE - 1)];
    if (c->len == n && memcmp(c->bytes, p, n) == 0) {
      for (k = 0; k < c->ntok; k++) emit(o, c->tok[k], base + c->end[k]);
      return;
    }
  }
  m = merge_small(b, p, n, st, tk);
  for (k = 0; k < m; k++) emit(o, tk[k], base + st[k + 1]);
  if (c && m <= CACHE_TOKENS) {
    c->len = (uint8_t)n;
    c->ntok = (uint8_t)m;
    memcpy(c->bytes, p, n);
    for (k = 0; k < m; k++) { c->tok[k] = tk[k]; c->end[k] = (uint8_t)st[k + 1]; }
  }
}

/* Tokens of a piece of at most HOT_BYTES (and at most small_max) bytes,
 * through the hot table; `avail` as for short_key. */
static void encode_short(sink_t *o, const unsigned char *p, size_t n, size_t base,
                         size_t avail) {
  bpe_t *b = o->b;
  uint64_t key = short_key(p, n, avail);
  hot_t *e = &b->hot[((key ^ n) * 0x9E3779B97F4A7C15ull) >> (64 - HOT_BITS)];
  uint32_t st[HOT_BYTES + 1], tk[HOT_BYTES];
  size_t m, k;
  if (e->len == n && e->key == key) {
    /* most pieces end here: count them, or copy their ids, without
     * emit()'s tests per token (5-10 % of count on English text) */
    if (!o->store) { o->n += e->ntok; return; }
    if (o->store == 1 && o->n + HOT_TOKENS <= b->ids_cap) {
      memcpy(b->ids + o->n, e->tok, sizeof e->tok); /* ids past ntok are overwritten later */
      o->n += e->ntok;
      return;
    }
    for (k = 0; k < e->ntok; k++) emit(o, e->tok[k], base + e->end[k]);
    return;
  }
  /* a miss: the piece's tokens as encode_piece finds them */
  m = 1;
  st[1] = (uint32_t)n;
  if (n == 1) {
    tk[0] = b->byte_rank[p[0]];
  } else {
    uint64_t hkey, h = hash_bytes(p, n, avail, &hkey);
    tk[0] = lookup_hk(b, p, n, h, hkey);
    if (tk[0] == NONE) m = merge_small(b, p, n, st, tk);
  }
  for (k = 0; k < m; k++) emit(o, tk[k], base + st[k + 1]);
  if (m <= HOT_TOKENS) {
    e->key = key;
    e->len = (uint8_t)n;
    e->ntok = (uint8_t)m;
    for (k = 0; k < m; k++) { e->tok[k] = tk[k]; e->end[k] = (uint8_t)st[k + 1]; }
  }
}

/* Encode s[from, to) as ordinary text (the split regex sees only that
 * span).  Stops after the piece that takes the count past `limit`.
 * Pieces come from the pre-tokenizer PIECES at a time (one call per batch,
 * with its ASCII fast paths inlined in its own loop); those of up to
 * HOT_BYTES bytes go through the hot table. */
#define PIECES 32
static void encode_ordinary(sink_t *o, const unsigned char *s, size_t from,
                            size_t to, size_t limit) {
  bpe_t *b = o->b;
  const unsigned char *t = s + from; /* offsets below are relative to from */
  size_t pos = 0, len = to - from, ends[PIECES];
  size_t short_max = b->small_max < HOT_BYTES ? b->small_max : HOT_BYTES;
  if (from >= to) return;
  if (!b->hot) {
    b->hot = calloc(HOT_SIZE, sizeof *b->hot);
    if (!b->hot) luaL_error(o->L, "slm.BPE: out of memory");
  }
  while (pos < len) {
    size_t m = slm_pretok_split(b->kind, t, len, pos, ends, PIECES), k, at;
    for (k = 0, at = pos; k < m; at = ends[k++]) {
      size_t n = ends[k] - at;
      if (n <= short_max) encode_short(o, t + at, n, from + at, len - at);
      else encode_piece(o, t + at, n, from + at, len - at);
      if (o->n > limit) return;
    }
    pos = ends[m - 1];
  }
}

/* Next allowed special token at or after `from`: its start, and index in
 * *which; `to` when there is none.  The longest wins at a given start. */
static size_t find_special(const bpe_t *b, const unsigned char *s, size_t from,
                           size_t to, size_t *which) {
  size_t i, k;
  for (i = from; i < to; i++) {
    size_t best = SIZE_MAX, bestlen = 0;
    if (!b->first[s[i]]) continue;
    for (k = 0; k < b->nsp; k++) {
      const special_t *sp = &b->sp[k];
      if (b->allow[k] && (unsigned char)sp->text[0] == s[i] && sp->len <= to - i &&
          sp->len > bestlen && memcmp(sp->text, s + i, sp->len) == 0) {
        best = k;
        bestlen = sp->len;
      }
    }
    if (best != SIZE_MAX) { *which = best; return i; }
  }
  return to;
}

static void encode_all(sink_t *o, const unsigned char *s, size_t len, int any_special) {
  size_t pos = 0;
  if (!any_special) { encode_ordinary(o, s, 0, len, SIZE_MAX); return; }
  while (pos < len) {
    size_t which = 0, at = find_special(o->b, s, pos, len, &which);
    encode_ordinary(o, s, pos, at, SIZE_MAX);
    if (at >= len) break;
    emit(o, o->b->sp[which].id, at + o->b->sp[which].len);
    pos = at + o->b->sp[which].len;
  }
}

/* ------------------------------------------------------------ Lua binding */

static bpe_t *check_bpe(lua_State *L) {
  bpe_t *b = (bpe_t *)luaL_checkudata(L, 1, BPE_MT);
  if (b->closed) luaL_argerror(L, 1, "tokenizer is closed");
  return b;
}

static const unsigned char *check_text(lua_State *L, int i, size_t *len) {
  const char *s = luaL_checklstring(L, i, len);
  if (*len >= UINT32_MAX) luaL_argerror(L, i, "text too long (4 GiB max)");
  return (const unsigned char *)s;
}

/* Which specials may be matched: nil/false none, true or "all" all, or a
 * set { [text] = true }.  Returns whether any is allowed. */
static int allowed_set(lua_State *L, bpe_t *b, int i) {
  size_t k;
  int any = 0;
  for (k = 0; k < b->nsp; k++) b->allow[k] = 0;
  if (lua_isnoneornil(L, i)) return 0;
  if (lua_type(L, i) == LUA_TBOOLEAN) {
    if (!lua_toboolean(L, i)) return 0;
    for (k = 0; k < b->nsp; k++) b->allow[k] = 1;
    return b->nsp > 0;
  }
  if (lua_type(L, i) == LUA_TSTRING) {
    if (strcmp(lua_tostring(L, i), "all") != 0)
      luaL_argerror(L, i, "allowed_special must be \"all\" or a set of tokens");
    for (k = 0; k < b->nsp; k++) b->allow[k] = 1;
    return b->nsp > 0;
  }
  luaL_checktype(L, i, LUA_TTABLE);
  lua_pushnil(L);
  while (lua_next(L, i)) {
    size_t l;
    const char *name;
    int found = 0;
    if (lua_type(L, -2) != LUA_TSTRING) luaL_argerror(L, i, "allowed_special keys must be strings");
    name = lua_tolstring(L, -2, &l);
    for (k = 0; k < b->nsp; k++) {
      if (b->sp[k].len == l && memcmp(b->sp[k].text, name, l) == 0) {
        found = 1;
        if (lua_toboolean(L, -1)) { b->allow[k] = 1; any = 1; }
      }
    }
    if (!found) luaL_error(L, "unknown special token '%s'", name);
    lua_pop(L, 1);
  }
  return any;
}

static int read_allowed(lua_State *L, bpe_t *b, int i) {
  int any = allowed_set(L, b, i);
  size_t k;
  memset(b->first, 0, sizeof b->first);
  for (k = 0; k < b->nsp; k++)
    if (b->allow[k]) b->first[(unsigned char)b->sp[k].text[0]] = 1;
  return any;
}

/* Common part of bpe_new / bpe_load: check kind and specials, push a new
 * empty userdata.  All pointers are NULL before anything is allocated, so
 * if loading fails __gc frees whatever was set. */
static bpe_t *new_bpe(lua_State *L) {
  const char *kname = luaL_checkstring(L, 2);
  int kind = slm_pretok_kind(kname);
  bpe_t *b;
  if (kind < 0) luaL_argerror(L, 2, "unknown pre-tokenizer (cl100k, o200k, llama3)");
  if (!lua_isnoneornil(L, 3)) luaL_checktype(L, 3, LUA_TTABLE);
  lua_settop(L, 3);
  b = (bpe_t *)slm_newuserdata(L, sizeof *b);
  memset(b, 0, sizeof *b);
  luaL_getmetatable(L, BPE_MT);
  lua_setmetatable(L, -2);
  b->kind = kind;
  b->small_max = SMALL_PIECE;
  return b;
}

static void finish_bpe(lua_State *L, bpe_t *b) {
  if (!lua_isnil(L, 3)) load_specials(L, b, 3);
  else b->allow = xrealloc(L, NULL, 1);
}

/* bpe_new(ranks, kind [, specials]) -> slm.BPE
 * ranks: tiktoken file contents (string) or { [bytes] = rank };
 * kind: "cl100k", "o200k" or "llama3"; specials: { [text] = id }. */
static int l_bpe_new(lua_State *L) {
  bpe_t *b;
  if (lua_type(L, 1) != LUA_TSTRING) luaL_checktype(L, 1, LUA_TTABLE);
  b = new_bpe(L);
  if (lua_type(L, 1) == LUA_TSTRING) {
    size_t n;
    const char *s = lua_tolstring(L, 1, &n);
    if (n >= UINT32_MAX) luaL_argerror(L, 1, "vocabulary too large");
    load_tiktoken(L, b, (const unsigned char *)s, n);
  } else {
    load_table(L, b, 1);
  }
  finish_bpe(L, b);
  return 1;
}

/* bpe_load(path, kind [, specials]) -> slm.BPE, or nil, message when the
 * file cannot be read.  Reads a tiktoken file through a read-only mapping
 * (no copy of the file in Lua memory): this is what keeps loading
 * o200k_base fast. */
static int l_bpe_load(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  bpe_t *b = new_bpe(L);
  int fd = open(path, O_RDONLY);
  struct stat st;
  void *map;
  if (fd < 0 || fstat(fd, &st) != 0) {
    if (fd >= 0) close(fd);
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", path, strerror(errno));
    return 2;
  }
  if ((uint64_t)st.st_size >= UINT32_MAX) {
    close(fd);
    return luaL_error(L, "%s: vocabulary too large", path);
  }
  if (st.st_size == 0) {
    close(fd);
    load_tiktoken(L, b, (const unsigned char *)"", 0);
    finish_bpe(L, b);
    return 1;
  }
  map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map == MAP_FAILED) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", path, strerror(errno));
    return 2;
  }
  /* the mapping is not Lua-owned: parse under a protected call so that a
   * malformed file still unmaps before the error propagates */
  lua_pushcfunction(L, parse_mapped);
  lua_pushvalue(L, -2);
  lua_pushlightuserdata(L, map);
  lua_pushinteger(L, (lua_Integer)st.st_size);
  if (lua_pcall(L, 3, 0, 0) != LUA_OK) {
    munmap(map, (size_t)st.st_size);
    return lua_error(L);
  }
  munmap(map, (size_t)st.st_size);
  finish_bpe(L, b);
  return 1;
}

static int l_gc(lua_State *L) {
  bpe_t *b = (bpe_t *)luaL_checkudata(L, 1, BPE_MT);
  if (!b->closed) bpe_free(b);
  return 0;
}

/* :encode(s [, allowed [, packed]]) -> { ids }, or an slm.IdList when
 * packed is true */
static int l_encode(lua_State *L) {
  bpe_t *b = check_bpe(L);
  size_t len;
  const unsigned char *s = check_text(L, 2, &len);
  int any = read_allowed(L, b, 3);
  int packed = lua_toboolean(L, 4);
  sink_t o = { L, b, 1, 0 };
  encode_all(&o, s, len, any);
  if (packed) slm_push_idlist(L, b->ids, o.n);
  else slm_push_idtable(L, b->ids, o.n);
  return 1;
}

/* :count(s [, allowed]) -> n, without storing tokens */
static int l_count(lua_State *L) {
  bpe_t *b = check_bpe(L);
  size_t len;
  const unsigned char *s = check_text(L, 2, &len);
  int any = read_allowed(L, b, 3);
  sink_t o = { L, b, 0, 0 };
  encode_all(&o, s, len, any);
  lua_pushinteger(L, (lua_Integer)o.n);
  return 1;
}

static const special_t *special_by_id(const bpe_t *b, lua_Integer id) {
  size_t k;
  for (k = 0; k < b->nsp; k++)
    if (b->sp[k].id == id) return &b->sp[k];
  return NULL;
}

/* :decode(ids) -> bytes; ids: a table of integers or an slm.IdList;
 * unknown ids raise */
static int l_decode(lua_State *L) {
  bpe_t *b = check_bpe(L);
  size_t i, n = 0;
  luaL_Buffer buf;
  const uint32_t *packed = slm_to_idlist(L, 2, &n);
  if (!packed) {
    if (lua_type(L, 2) != LUA_TTABLE)
      return luaL_argerror(L, 2, lua_pushfstring(L, "table of token ids or slm.IdList expected, got %s",
                                                 luaL_typename(L, 2)));
    n = lua_rawlen(L, 2);
  }
  luaL_buffinit(L, &buf);
  for (i = 1; i <= n; i++) {
    lua_Integer id;
    if (packed) {
      id = (lua_Integer)packed[i - 1];
    } else {
      int isnum;
      slm_rawgeti(L, 2, i);
      id = lua_tointegerx(L, -1, &isnum);
      lua_pop(L, 1);
      if (!isnum) luaL_error(L, "bad token id at index %d (not an integer)", (int)i);
    }
    if (id >= 0 && (uint64_t)id < b->nranks && b->len[id]) {
      luaL_addlstring(&buf, (const char *)b->blob + b->off[id], b->len[id]);
    } else {
      const special_t *sp = special_by_id(b, id);
      if (!sp) {
        char num[24]; /* lua_pushfstring has no 64-bit format in Lua 5.1 */
        snprintf(num, sizeof num, "%lld", (long long)id);
        luaL_error(L, "unknown token id %s at index %d", num, (int)i);
      }
      luaL_addlstring(&buf, sp->text, sp->len);
    }
  }
  luaL_pushresult(&buf);
  return 1;
}

/* Number of tokens of s[from, to) encoded on its own; counting stops soon
 * after it passes `limit`. */
static size_t count_span(lua_State *L, bpe_t *b, const unsigned char *s,
                         size_t from, size_t to, size_t limit) {
  sink_t o = { L, b, 0, 0 };
  encode_ordinary(&o, s, from, to, limit);
  return o.n;
}

/* :truncate(s, n) -> longest prefix found of at most n tokens that ends on
 * a character boundary.  Candidates are the ends of the first k tokens of
 * s (k = n, n-1, ...), moved back to a character boundary; the first whose
 * own encoding has at most n tokens wins (usually the first one tried). */
static int l_truncate(lua_State *L) {
  bpe_t *b = check_bpe(L);
  size_t len, k, cut, prev = SIZE_MAX;
  const unsigned char *s = check_text(L, 2, &len);
  lua_Integer n = luaL_checkinteger(L, 3);
  sink_t o = { L, b, 2, 0 };
  if (n < 0) luaL_argerror(L, 3, "must be >= 0");
  encode_ordinary(&o, s, 0, len, (size_t)n);
  if (o.n <= (size_t)n) { lua_settop(L, 2); return 1; }
  for (k = (size_t)n; k > 0; k--) {
    cut = slm_utf8_floor(s, len, b->ends[k - 1]);
    if (cut == prev || cut == 0) continue;
    prev = cut;
    if (count_span(L, b, s, 0, cut, (size_t)n) <= (size_t)n) {
      lua_pushlstring(L, (const char *)s, cut);
      return 1;
    }
  }
  lua_pushliteral(L, "");
  return 1;
}

/* Token index t (0..T) -> byte offset of the start of token t. */
static size_t tok_start(const bpe_t *b, size_t t) { return t ? b->ends[t - 1] : 0; }

/* :chunks(s, n, overlap) -> { strings }, { start offsets (1-based) }
 * Each chunk has at most n tokens (checked by encoding it on its own) and
 * starts and ends on character boundaries; the next chunk starts `overlap`
 * tokens (of s's own encoding) before the previous one ended, so together
 * they cover s.  Only when one character needs more than n tokens is it
 * cut between bytes. */
static int l_chunks(lua_State *L) {
  bpe_t *b = check_bpe(L);
  size_t len, T, a_tok = 0, a = 0, idx = 0;
  const unsigned char *s = check_text(L, 2, &len);
  lua_Integer n = luaL_checkinteger(L, 3);
  lua_Integer ov = luaL_optinteger(L, 4, 0);
  sink_t o = { L, b, 2, 0 };
  if (n < 1) luaL_argerror(L, 3, "must be >= 1");
  if (ov < 0 || ov >= n) luaL_argerror(L, 4, "must be >= 0 and < n");
  encode_ordinary(&o, s, 0, len, SIZE_MAX);
  T = o.n;
  lua_newtable(L);
  lua_newtable(L);
  if (len == 0) return 2;
  for (;;) {
    size_t k = a_tok + (size_t)n < T ? a_tok + (size_t)n : T, e = 0, e_tok, nt;
    /* the furthest candidate end whose chunk is within n tokens */
    for (; k > a_tok; k--) {
      e = k == T ? len : slm_utf8_floor(s, len, b->ends[k - 1]);
      if (e <= a) continue;
      if (count_span(L, b, s, a, e, (size_t)n) <= (size_t)n) break;
    }
    if (k == a_tok) { /* one character spans more than n tokens */
      k = a_tok + 1;
      while (k < T && b->ends[k - 1] <= a) k++;
      e = k == T ? len : b->ends[k - 1];
      if (e <= a) e = len;
    }
    lua_pushlstring(L, (const char *)s + a, e - a);
    slm_rawseti(L, -3, idx + 1);
    lua_pushinteger(L, (lua_Integer)a + 1);
    slm_rawseti(L, -2, idx + 1);
    idx++;
    if (e >= len) break;
    /* tokens of s that end at or before e, then step back `overlap` */
    e_tok = k;
    while (e_tok > 0 && b->ends[e_tok - 1] > e) e_tok--;
    nt = e_tok > (size_t)ov ? e_tok - (size_t)ov : 0;
    {
      size_t na = slm_utf8_floor(s, len, tok_start(b, nt));
      while (na <= a && nt < e_tok) {
        nt++;
        na = slm_utf8_floor(s, len, tok_start(b, nt));
      }
      if (na <= a || na > e) { na = e; nt = e_tok; }
      a = na;
      a_tok = nt;
    }
  }
  return 2;
}

/* :split(s) -> { pieces } (the pre-tokenizer alone) */
static int l_split(lua_State *L) {
  bpe_t *b = check_bpe(L);
  size_t len, pos = 0, i = 0;
  const unsigned char *s = check_text(L, 2, &len);
  lua_newtable(L);
  while (pos < len) {
    size_t e = slm_pretok_next(b->kind, s, len, pos);
    lua_pushlstring(L, (const char *)s + pos, e - pos);
    slm_rawseti(L, -2, ++i);
    pos = e;
  }
  return 1;
}

/* :token_bytes(id) -> bytes or nil */
static int l_token_bytes(lua_State *L) {
  bpe_t *b = check_bpe(L);
  lua_Integer id = luaL_checkinteger(L, 2);
  const special_t *sp;
  if (id >= 0 && (uint64_t)id < b->nranks && b->len[id]) {
    lua_pushlstring(L, (const char *)b->blob + b->off[id], b->len[id]);
    return 1;
  }
  sp = special_by_id(b, id);
  if (sp) lua_pushlstring(L, sp->text, sp->len);
  else lua_pushnil(L);
  return 1;
}

/* :special(text) -> id or nil */
static int l_special(lua_State *L) {
  bpe_t *b = check_bpe(L);
  size_t l, k;
  const char *name = luaL_checklstring(L, 2, &l);
  for (k = 0; k < b->nsp; k++) {
    if (b->sp[k].len == l && memcmp(b->sp[k].text, name, l) == 0) {
      lua_pushinteger(L, (lua_Integer)b->sp[k].id);
      return 1;
    }
  }
  lua_pushnil(L);
  return 1;
}

/* Bytes of C heap this vocabulary holds: its tables, its specials and the
 * scratch buffers and caches it has grown so far (the userdata itself
 * included). */
static size_t bpe_bytes(const bpe_t *b) {
  size_t n = sizeof *b, i;
  if (b->blob) n += b->blob_len + 1;
  n += (size_t)b->rank_cap * (sizeof *b->off + sizeof *b->len);
  if (b->tab) n += ((size_t)b->mask + 1) * sizeof *b->tab;
  if (b->sp) n += (b->nsp + 1) * sizeof *b->sp;
  for (i = 0; i < b->nsp; i++) n += b->sp[i].len;
  if (b->allow) n += b->nsp + 1;
  n += (b->ids_cap + b->ends_cap) * sizeof(uint32_t) + b->work_cap;
  if (b->cache) n += CACHE_SIZE * sizeof *b->cache;
  if (b->hot) n += HOT_SIZE * sizeof *b->hot;
  return n;
}

/* :info() -> { tokens, ranks, specials, max_token_bytes, bytes } */
static int l_info(lua_State *L) {
  bpe_t *b = check_bpe(L);
  uint32_t r, maxlen = 0;
  for (r = 0; r < b->nranks; r++) if (b->len[r] > maxlen) maxlen = b->len[r];
  lua_createtable(L, 0, 5);
  lua_pushinteger(L, (lua_Integer)bpe_bytes(b));
  lua_setfield(L, -2, "bytes");
  lua_pushinteger(L, (lua_Integer)b->ntokens);
  lua_setfield(L, -2, "tokens");
  lua_pushinteger(L, (lua_Integer)b->nranks);
  lua_setfield(L, -2, "ranks");
  lua_pushinteger(L, (lua_Integer)b->nsp);
  lua_setfield(L, -2, "specials");
  lua_pushinteger(L, (lua_Integer)maxlen);
  lua_setfield(L, -2, "max_token_bytes");
  return 1;
}

/* :_heap_threshold(n): pieces longer than n bytes (1..48) merge on the
 * heap; for tests, which check both paths give the same tokens. */
static int l_heap_threshold(lua_State *L) {
  bpe_t *b = check_bpe(L);
  lua_Integer n = luaL_checkinteger(L, 2);
  luaL_argcheck(L, n >= 1 && n <= SMALL_PIECE, 2, "must be 1..48");
  b->small_max = (size_t)n;
  return 0;
}

static const luaL_Reg bpe_methods[] = {
  { "_heap_threshold", l_heap_threshold },
  { "encode", l_encode },
  { "count", l_count },
  { "decode", l_decode },
  { "truncate", l_truncate },
  { "chunks", l_chunks },
  { "split", l_split },
  { "token_bytes", l_token_bytes },
  { "special", l_special },
  { "info", l_info },
  { "close", l_gc },
  { NULL, NULL },
};

int slm_open_bpe(lua_State *L) {
  slm_new_class(L, BPE_MT, bpe_methods, l_gc, NULL);
  lua_pushcfunction(L, l_bpe_new);
  lua_setfield(L, -2, "bpe_new");
  lua_pushcfunction(L, l_bpe_load);
  lua_setfield(L, -2, "bpe_load");
  return 0;
}
