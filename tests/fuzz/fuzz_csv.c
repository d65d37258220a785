/*
 * fuzz_csv.c - libFuzzer harness for the CSV parser and quoting (csrc/csv.h).
 *
 * Input layout: byte 0 picks the options (bits 0-1: separator , ; TAB |,
 * bit 2: keep the BOM, bit 3: max_record 16 bytes), byte 1 seeds the chunk
 * splitter, the rest is the document. It is parsed whole, one byte at a
 * time (short inputs) and in random chunks (empty ones included); every run
 * must report the same records. Each record is checked on its own (numbers
 * consecutive, lines never going back, faults without fields, excerpts
 * short, field data within max_record), and every good record, written
 * again with the quoting functions, must parse back to the same fields.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "csv.h"

typedef struct rec {
  unsigned char *p;
  size_t len, cap;
  size_t records, last_line, max_record;
  unsigned char sep;
  int check_round_trip;
} rec;

static void die(const char *what) {
  fprintf(stderr, "fuzz_csv: invariant broken: %s\n", what);
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

static void round_trip(const rec *r, const slm_csv_record *x);

static void on_record(void *ud, const slm_csv_record *x) {
  rec *r = (rec *)ud;
  size_t i, from = 0;
  if (x->record != r->records + 1) die("record numbers not consecutive");
  r->records = x->record;
  if (x->line < r->last_line || x->line == 0) die("record line went back");
  r->last_line = x->line;
  put(r, &x->line, sizeof x->line);
  put(r, &x->err, sizeof x->err);
  if (x->err) {
    if (x->nfields) die("a fault with fields");
    if (x->excerpt_len > SLM_CSV_EXCERPT) die("excerpt too long");
    if (x->err_line < x->line) die("fault before its record");
    if (x->err_field == 0) die("fault in field 0");
    put(r, &x->err_line, sizeof x->err_line);
    put(r, &x->err_field, sizeof x->err_field);
    put(r, x->excerpt, x->excerpt_len);
    return;
  }
  if (x->nfields == 0) die("a good record without fields");
  if (r->max_record && x->ends[x->nfields - 1] > r->max_record) die("record over max_record");
  put(r, &x->nfields, sizeof x->nfields);
  for (i = 0; i < x->nfields; i++) {
    size_t n;
    if (x->ends[i] < from) die("field ends going back");
    n = x->ends[i] - from;
    put(r, &n, sizeof n);
    put(r, x->data + from, n);
    from = x->ends[i];
  }
  if (r->check_round_trip) round_trip(r, x);
}

typedef struct one {
  const slm_csv_record *want;
  int seen;
} one;

static void on_again(void *ud, const slm_csv_record *x) {
  one *o = (one *)ud;
  size_t i;
  if (o->seen++) die("a written record parsed as more than one");
  if (x->err) die("a written record parsed as a fault");
  if (x->nfields != o->want->nfields) die("a written record changed its field count");
  for (i = 0; i < x->nfields; i++) {
    size_t a0 = i ? x->ends[i - 1] : 0, b0 = i ? o->want->ends[i - 1] : 0;
    size_t an = x->ends[i] - a0, bn = o->want->ends[i] - b0;
    if (an != bn || (an && memcmp(x->data + a0, o->want->data + b0, an) != 0))
      die("a written field came back different");
  }
}

static void round_trip(const rec *r, const slm_csv_record *x) {
  size_t i, total = 2, from = 0;
  char *buf, *out;
  slm_csv p;
  one o;
  for (i = 0; i < x->nfields; i++) {
    const char *s = x->data + from;
    size_t n = x->ends[i] - from;
    total += slm_csv_field_size(s, n, slm_csv_needs_quotes(s, n, r->sep, x->nfields == 1)) + 1;
    from = x->ends[i];
  }
  buf = out = (char *)malloc(total);
  if (!buf) die("out of memory in the harness");
  for (i = 0, from = 0; i < x->nfields; i++) {
    const char *s = x->data + from;
    size_t n = x->ends[i] - from;
    if (i) *out++ = (char)r->sep;
    out = slm_csv_put_field(out, s, n, slm_csv_needs_quotes(s, n, r->sep, x->nfields == 1));
    from = x->ends[i];
  }
  *out++ = '\r';
  *out++ = '\n';
  slm_csv_init(&p, r->sep, 0, 0);
  o.want = x;
  o.seen = 0;
  if (slm_csv_feed(&p, buf, (size_t)(out - buf), on_again, &o) != SLM_CSV_OK ||
      slm_csv_finish(&p, on_again, &o) != SLM_CSV_OK)
    die("out of memory re-parsing");
  if (o.seen != 1) die("a written record parsed as nothing");
  slm_csv_free(&p);
  free(buf);
}

static const unsigned char SEPS[4] = {',', ';', '\t', '|'};

static void run(const uint8_t *opt, const uint8_t *data, size_t size, size_t mode, unsigned seed, rec *r) {
  slm_csv p;
  size_t i = 0;
  r->sep = SEPS[opt[0] & 3];
  r->max_record = (opt[0] & 8) ? 16 : 0;
  r->records = 0;
  r->last_line = 0;
  slm_csv_init(&p, r->sep, !(opt[0] & 4), r->max_record);
  while (i < size) {
    size_t n = mode == 0 ? size - i : mode == 1 ? 1 : (size_t)(rand_r(&seed) % 17);
    if (n > size - i) n = size - i;
    if (slm_csv_feed(&p, (const char *)data + i, n, on_record, r) != SLM_CSV_OK) die("feed failed");
    i += n;
  }
  if (slm_csv_finish(&p, on_record, r) != SLM_CSV_OK) die("finish failed");
  slm_csv_free(&p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  rec whole, other;
  if (size < 2) return 0;
  memset(&whole, 0, sizeof whole);
  memset(&other, 0, sizeof other);
  whole.check_round_trip = 1;
  run(data, data + 2, size - 2, 0, data[1], &whole);
  if (size < 4096) {
    run(data, data + 2, size - 2, 1, data[1], &other);
    if (other.len != whole.len || (whole.len && memcmp(other.p, whole.p, whole.len) != 0))
      die("byte at a time differs from whole");
    other.len = 0;
  }
  run(data, data + 2, size - 2, 2, data[1], &other);
  if (other.len != whole.len || (whole.len && memcmp(other.p, whole.p, whole.len) != 0))
    die("random chunks differ from whole");
  free(whole.p);
  free(other.p);
  return 0;
}
