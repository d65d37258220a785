/*
 * fuzz_sse.c - libFuzzer harness for the SSE parser's C API (csrc/sse.h).
 *
 * Input layout: byte 0 picks max_event (high bit set: 1..128 bytes, else the
 * 16 MB default), byte 1 seeds the chunk splitter, the rest is the stream.
 * The stream is parsed whole, one byte at a time (short inputs), in random
 * chunks (empty ones included) and again after reset() and finish(); every
 * run must give the same events, error, last id, retry and finish() count.
 * Each event is also checked on its own: no CR in data, no CR/LF in type
 * or id, no NUL in id, never longer than max_event.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sse.h"

typedef struct rec {
  unsigned char *p;
  size_t len, cap;
  size_t events;
  size_t max_event;
} rec;

static void die(const char *what) {
  fprintf(stderr, "fuzz_sse: invariant broken: %s\n", what);
  abort();
}

static void put(rec *r, const void *s, size_t n) {
  if (r->len + n > r->cap) {
    size_t cap = r->cap ? r->cap : 256;
    while (cap < r->len + n) cap *= 2;
    r->p = (unsigned char *)realloc(r->p, cap);
    if (!r->p) die("out of memory in the harness");
    r->cap = cap;
  }
  if (n) memcpy(r->p + r->len, s, n);
  r->len += n;
}

static void put_field(rec *r, const char *s, size_t n) {
  put(r, &n, sizeof n);
  put(r, s, n);
}

static void on_event(void *ud, const slm_sse_event *ev) {
  rec *r = (rec *)ud;
  if (ev->data_len > r->max_event) die("event longer than max_event");
  if (ev->data_len && memchr(ev->data, '\r', ev->data_len)) die("CR in data");
  if (ev->type_len == 0) die("empty event type");
  if (memchr(ev->type, '\r', ev->type_len) || memchr(ev->type, '\n', ev->type_len))
    die("line end in event type");
  if (ev->id) {
    if (ev->id_len == 0) die("empty id reported as set");
    if (memchr(ev->id, '\0', ev->id_len) || memchr(ev->id, '\r', ev->id_len) ||
        memchr(ev->id, '\n', ev->id_len))
      die("bad byte in id");
  }
  put_field(r, ev->data, ev->data_len);
  put_field(r, ev->type, ev->type_len);
  if (ev->id) put_field(r, ev->id, ev->id_len);
  else put(r, "-", 1);
  r->events++;
}

/* The end state of one run, serialized after the events. */
static void put_state(rec *r, slm_sse *p, int rc) {
  size_t n, idlen, n2;
  long long retry, retry2;
  int has_retry;
  const char *id = slm_sse_last_id(p, &idlen), *id2;
  put(r, &rc, sizeof rc);
  if (id) put_field(r, id, idlen);
  else put(r, "-", 1);
  has_retry = slm_sse_retry(p, &retry);
  if (has_retry) put(r, &retry, sizeof retry);
  else put(r, "-", 1);
  n = slm_sse_finish(p);
  put(r, &n, sizeof n);
  /* finish() keeps the last id and retry */
  id2 = slm_sse_last_id(p, &n2);
  if ((id == NULL) != (id2 == NULL) || n2 != idlen || (id && memcmp(id, id2, idlen) != 0))
    die("finish() changed the last id");
  if (slm_sse_retry(p, &retry2) != has_retry || (has_retry && retry2 != retry))
    die("finish() changed retry");
}

static uint32_t rng_next(uint32_t *s) {
  *s ^= *s << 13;
  *s ^= *s >> 17;
  *s ^= *s << 5;
  return *s;
}

/* Feeds buf in chunks: mode 0 whole, 1 byte by byte, 2 random sizes. */
static int feed_all(slm_sse *p, const char *buf, size_t len, int mode,
                    uint32_t seed, rec *r) {
  size_t off = 0;
  int rc = SLM_SSE_OK;
  uint32_t s = seed * 2654435761u + 1;
  if (mode == 0) return slm_sse_feed(p, buf, len, on_event, r);
  while (off < len) {
    size_t n = 1;
    if (mode == 2) {
      uint32_t x = rng_next(&s);
      n = (x & 3) == 0 ? 0 : (x >> 8) % 17; /* small chunks, some empty */
      if ((x & 0xF0) == 0) n = (x >> 8) % 300;
      if (n > len - off) n = len - off;
    }
    rc = slm_sse_feed(p, buf + off, n, on_event, r);
    if (rc != SLM_SSE_OK) {
      /* a failed parser stays failed */
      if (slm_sse_feed(p, "data: x\n\n", 9, on_event, r) != rc) die("error not sticky");
      return rc;
    }
    off += n;
  }
  return rc;
}

static void run(const char *buf, size_t len, size_t max_event, int mode,
                uint32_t seed, rec *r) {
  slm_sse p;
  int rc;
  memset(r, 0, sizeof *r);
  r->max_event = max_event;
  slm_sse_init(&p, max_event);
  rc = feed_all(&p, buf, len, mode, seed, r);
  put_state(r, &p, rc);
  slm_sse_free(&p);
}

static void same(const rec *a, const rec *b, const char *what) {
  if (a->len != b->len || a->events != b->events || memcmp(a->p, b->p, a->len) != 0)
    die(what);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  rec whole, other;
  size_t max_event, len;
  const char *buf;
  slm_sse p;
  int rc;
  if (size < 2) return 0;
  max_event = (data[0] & 0x80) ? (size_t)(data[0] & 0x7F) + 1 : SLM_SSE_DEFAULT_MAX_EVENT;
  buf = (const char *)data + 2;
  len = size - 2;

  run(buf, len, max_event, 0, data[1], &whole);

  if (len <= 4096) {
    run(buf, len, max_event, 1, data[1], &other);
    same(&whole, &other, "byte-at-a-time differs from whole");
    free(other.p);
  }
  run(buf, len, max_event, 2, data[1], &other);
  same(&whole, &other, "random chunks differ from whole");
  free(other.p);
  run(buf, len, max_event, 2, data[1] ^ 0x5Au, &other);
  same(&whole, &other, "random chunks (2) differ from whole");
  free(other.p);

  /* reset() gives a fresh parser, whatever state it was in */
  memset(&other, 0, sizeof other);
  other.max_event = max_event;
  slm_sse_init(&p, max_event);
  (void)slm_sse_feed(&p, buf, len / 2, on_event, &other);
  slm_sse_reset(&p);
  free(other.p);
  memset(&other, 0, sizeof other);
  other.max_event = max_event;
  rc = feed_all(&p, buf, len, 2, data[1] + 1u, &other);
  put_state(&other, &p, rc);
  same(&whole, &other, "reset() parser differs from a fresh one");
  free(other.p);
  slm_sse_free(&p);
  slm_sse_free(&p); /* idempotent */

  free(whole.p);
  return 0;
}
