/*
 * sse.c - incremental Server-Sent Events parser: core.sse_parser().
 *
 * Owns the byte-level framing of text/event-stream bodies, exactly as the
 * WHATWG HTML "parsing an event stream" section says: BOM stripping, CR/LF/
 * CRLF line ends (also split across chunks), comments, field parsing, data
 * joining, event type, last event ID and retry.  It is length-based and
 * binary-safe, never truncates (an event over max_event is an error) and
 * never re-scans buffered bytes: each input byte is looked at by memchr and
 * copied at most once into the parser before it becomes a Lua string.
 *
 * The parser itself is a small C API (sse.h) with no Lua in it, so the fuzz
 * harness can drive it; the Lua binding is at the end of this file.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "slm.h"
#include "sse.h"

/* Where the current line stands. */
enum {
  ST_START = 0, /* at the first byte of a line */
  ST_NAME,      /* reading the field name (p->name) */
  ST_VALUE0,    /* just after the colon: one space may follow */
  ST_VALUE,     /* reading the value of p->field */
  ST_SKIP       /* comment or unknown field: skip to the line end */
};

/* Fields we act on. */
enum { F_NONE = 0, F_DATA, F_EVENT, F_ID, F_RETRY };

#define RETRY_MAX 9007199254740991ULL /* 2^53 - 1: exact in every Lua */
#define KEEP_CAP ((size_t)1 << 20)    /* larger buffers are not kept idle */

static const unsigned char BOM[3] = {0xEF, 0xBB, 0xBF};

/* ---- buffers ----------------------------------------------------------- */

static int buf_reserve(slm_sse_buf *b, size_t extra) {
  size_t need = b->len + extra, cap;
  char *np;
  if (need <= b->cap) return 0;
  if (need < b->len) return -1; /* overflow */
  cap = b->cap ? b->cap : 64;
  while (cap < need) {
    if (cap > ((size_t)-1) / 2) { cap = need; break; }
    cap *= 2;
  }
  np = (char *)realloc(b->p, cap);
  if (np == NULL) return -1;
  b->p = np;
  b->cap = cap;
  return 0;
}

static void buf_free(slm_sse_buf *b) {
  free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
}

/* Appends n bytes to one of the pending-event buffers, enforcing max_event
 * on everything the pending event holds. */
static int event_append(slm_sse *p, slm_sse_buf *b, const char *s, size_t n) {
  size_t held;
  if (n == 0) return 0;
  held = p->data.len + p->type.len + p->idval.len;
  if (n > p->max_event || held > p->max_event - n) {
    p->err = SLM_SSE_ETOOBIG;
    return -1;
  }
  if (buf_reserve(b, n) != 0) {
    p->err = SLM_SSE_ENOMEM;
    return -1;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
  return 0;
}

/* ---- public API -------------------------------------------------------- */

void slm_sse_init(slm_sse *p, size_t max_event) {
  memset(p, 0, sizeof *p);
  p->max_event = max_event ? max_event : SLM_SSE_DEFAULT_MAX_EVENT;
}

void slm_sse_error_field(slm_sse *p, int on) {
  p->error_field = on != 0;
}

void slm_sse_free(slm_sse *p) {
  size_t max_event = p->max_event;
  int error_field = p->error_field;
  buf_free(&p->data);
  buf_free(&p->type);
  buf_free(&p->idval);
  buf_free(&p->idbuf);
  buf_free(&p->lastid);
  slm_sse_chat_free(&p->chat);
  slm_sse_init(p, max_event);
  p->error_field = error_field;
}

/* Per-stream state back to "start of a new stream"; the last event ID
 * string and the retry value are kept (they survive reconnections). */
static void stream_reset(slm_sse *p) {
  p->data.len = p->type.len = p->idval.len = 0;
  p->data_lines = 0;
  p->error_event = 0;
  p->pending = 0;
  p->state = ST_START;
  p->field = F_NONE;
  p->name_len = 0;
  p->bom = 0;
  p->cr = 0;
  if (p->data.cap > KEEP_CAP) buf_free(&p->data);
  if (p->idval.cap > KEEP_CAP) buf_free(&p->idval);
  if (p->type.cap > KEEP_CAP) buf_free(&p->type);
  if (p->chat.text.cap > KEEP_CAP) buf_free(&p->chat.text);
  /* An id line of the dropped event was never committed: forget it. */
  if (p->id_dirty) {
    p->idbuf.len = 0;
    if (p->lastid.len && buf_reserve(&p->idbuf, p->lastid.len) == 0) {
      memcpy(p->idbuf.p, p->lastid.p, p->lastid.len);
      p->idbuf.len = p->lastid.len;
    }
    p->id_dirty = 0;
  }
}

void slm_sse_reset(slm_sse *p) {
  stream_reset(p);
  p->idbuf.len = p->lastid.len = 0;
  p->id_dirty = 0;
  p->has_retry = 0;
  p->retry = 0;
  p->err = SLM_SSE_OK;
}

size_t slm_sse_finish(slm_sse *p) {
  size_t n = p->pending + (p->bom > 0 ? (size_t)p->bom : 0);
  if (p->err) n = 0;
  stream_reset(p);
  return n;
}

const char *slm_sse_last_id(const slm_sse *p, size_t *len) {
  *len = p->lastid.len;
  return p->lastid.len ? p->lastid.p : NULL;
}

int slm_sse_retry(const slm_sse *p, long long *ms) {
  *ms = p->retry;
  return p->has_retry;
}

/* ---- the line machine -------------------------------------------------- */

/* Finds line ends in one chunk.  The next LF and the next CR are each
 * searched once and remembered, so a chunk is scanned at most twice
 * (once per byte value) however many lines it holds. */
typedef struct scan {
  const char *end;
  const char *lf, *cr; /* next LF / CR at or after the last query, end when
                          none, NULL when not searched yet */
} scan;

static const char *find_eol(scan *sc, const char *s) {
  const char *q;
  if (sc->lf == NULL || sc->lf < s) {
    q = (const char *)memchr(s, '\n', (size_t)(sc->end - s));
    sc->lf = q ? q : sc->end;
  }
  if (sc->cr == NULL || sc->cr < s) {
    q = (const char *)memchr(s, '\r', (size_t)(sc->end - s));
    sc->cr = q ? q : sc->end;
  }
  q = sc->lf < sc->cr ? sc->lf : sc->cr;
  return q == sc->end ? NULL : q;
}

/* Consumes the line end at q (CR, LF or CRLF); returns the next byte. */
static const char *eat_eol(slm_sse *p, const char *q, const char *end) {
  if (*q == '\r') {
    if (q + 1 == end) {
      p->cr = 1; /* a LF opening the next chunk belongs to this line end */
      return end;
    }
    if (q[1] == '\n') return q + 2;
  }
  return q + 1;
}

/* A field name is complete (colon or line end seen). */
static void open_field(slm_sse *p) {
  const char *n = p->name;
  p->field = F_NONE;
  switch (p->name_len) {
    case 2:
      if (memcmp(n, "id", 2) == 0) {
        p->field = F_ID;
        p->idval.len = 0;
      }
      break;
    case 4:
      if (memcmp(n, "data", 4) == 0) p->field = F_DATA;
      break;
    case 5:
      if (memcmp(n, "event", 5) == 0) {
        p->field = F_EVENT;
        p->type.len = 0;
      } else if (memcmp(n, "retry", 5) == 0) {
        p->field = F_RETRY;
        p->racc = 0;
        p->rbad = 0;
      } else if (p->error_field && memcmp(n, "error", 5) == 0) {
        p->field = F_DATA; /* read as data; the event becomes an "error" one */
        p->error_event = 1;
      }
      break;
    default:
      break;
  }
}

/* The data field opens: lines after the first are joined with LF. */
static int open_data(slm_sse *p) {
  p->field = F_DATA;
  if (p->data_lines++ > 0) return event_append(p, &p->data, "\n", 1);
  return 0;
}

static int value_bytes(slm_sse *p, const char *s, size_t n) {
  size_t i;
  switch (p->field) {
    case F_DATA: return event_append(p, &p->data, s, n);
    case F_EVENT: return event_append(p, &p->type, s, n);
    case F_ID: return event_append(p, &p->idval, s, n);
    case F_RETRY:
      for (i = 0; i < n && p->rbad < 2; i++) {
        unsigned d = (unsigned char)s[i] - (unsigned)'0';
        if (d > 9 || p->racc > (RETRY_MAX - d) / 10) p->rbad = 2;
        else {
          p->racc = p->racc * 10 + d;
          p->rbad = 1;
        }
      }
      return 0;
    default: return 0;
  }
}

/* The line of the current field ended. */
static void close_field(slm_sse *p) {
  slm_sse_buf t;
  switch (p->field) {
    case F_ID:
      if (p->idval.len && memchr(p->idval.p, '\0', p->idval.len)) break;
      t = p->idbuf; /* the value becomes the last event ID buffer */
      p->idbuf = p->idval;
      p->idval = t;
      p->idval.len = 0;
      p->id_dirty = 1;
      break;
    case F_RETRY:
      if (p->rbad == 1) {
        p->retry = (long long)p->racc;
        p->has_retry = 1;
      }
      break;
    default:
      break;
  }
  p->field = F_NONE;
}

/* A blank line: dispatch the pending event. */
static int dispatch(slm_sse *p, slm_sse_on_event on_event, void *ud) {
  if (p->id_dirty) {
    p->lastid.len = 0;
    if (p->idbuf.len) {
      if (buf_reserve(&p->lastid, p->idbuf.len) != 0) {
        p->err = SLM_SSE_ENOMEM;
        return -1;
      }
      memcpy(p->lastid.p, p->idbuf.p, p->idbuf.len);
      p->lastid.len = p->idbuf.len;
    }
    p->id_dirty = 0;
  }
  if (p->data_lines) {
    slm_sse_event ev;
    ev.data = p->data.len ? p->data.p : "";
    ev.data_len = p->data.len;
    if (p->error_event) {
      ev.type = "error";
      ev.type_len = 5;
    } else if (p->type.len) {
      ev.type = p->type.p;
      ev.type_len = p->type.len;
    } else {
      ev.type = "message";
      ev.type_len = 7;
    }
    ev.id = p->lastid.len ? p->lastid.p : NULL;
    ev.id_len = p->lastid.len;
    /* Reset before the callback, and mark the parser failed while it runs:
     * if it never returns (a Lua memory error longjmps out of feed), the
     * parser is left consistent and reports "out of memory" from then on. */
    p->data.len = 0;
    p->data_lines = 0;
    p->type.len = 0;
    p->error_event = 0;
    if (on_event) {
      p->err = SLM_SSE_ENOMEM;
      on_event(ud, &ev);
      p->err = SLM_SSE_OK;
    }
    /* A big buffer is kept while events are big, dropped when they shrink. */
    if (p->data.cap > KEEP_CAP && ev.data_len < p->data.cap / 4) buf_free(&p->data);
  }
  p->data.len = 0;
  p->data_lines = 0;
  p->type.len = 0;
  p->error_event = 0;
  return 0;
}

/* Runs the line machine over [s, end).  Returns 0 or -1 (p->err set). */
static int run(slm_sse *p, const char *s, const char *end,
               slm_sse_on_event on_event, void *ud) {
  const char *start = s, *mark = NULL, *q;
  scan sc;
  sc.end = end;
  sc.lf = sc.cr = NULL;
  if (p->cr && s < end) { /* CR ended the previous chunk: skip its LF */
    p->cr = 0;
    if (*s == '\n') {
      s++;
      if (p->pending) p->pending++;
      start = s;
    }
  }
  while (s < end) {
    switch (p->state) {
      case ST_START: {
        char c = *s;
        if (c == '\n' || c == '\r') {
          s = eat_eol(p, s, end);
          if (dispatch(p, on_event, ud) != 0) return -1;
          mark = s;
          continue;
        }
        if (c == ':') {
          p->state = ST_SKIP;
          s++;
          continue;
        }
        if (end - s >= 5 && memcmp(s, "data:", 5) == 0) {
          if (open_data(p) != 0) return -1;
          s += 5;
          p->state = ST_VALUE0;
          continue;
        }
        p->name_len = 0;
        p->state = ST_NAME;
        continue;
      }
      case ST_NAME:
        while (s < end) {
          char c = *s;
          if (c == ':') {
            s++;
            open_field(p);
            if (p->field == F_DATA && open_data(p) != 0) return -1;
            p->state = p->field == F_NONE ? ST_SKIP : ST_VALUE0;
            break;
          }
          if (c == '\n' || c == '\r') { /* no colon: the value is empty */
            open_field(p);
            if (p->field == F_DATA && open_data(p) != 0) return -1;
            close_field(p);
            s = eat_eol(p, s, end);
            p->state = ST_START;
            break;
          }
          if (p->name_len == 5) { /* longer than any field we know */
            p->state = ST_SKIP;
            break;
          }
          p->name[p->name_len++] = c;
          s++;
        }
        continue;
      case ST_VALUE0:
        if (*s == ' ') s++;
        p->state = ST_VALUE;
        continue;
      case ST_VALUE: {
        size_t n;
        q = find_eol(&sc, s);
        n = (size_t)((q ? q : end) - s);
        if (n && value_bytes(p, s, n) != 0) return -1;
        if (q == NULL) {
          s = end;
          continue;
        }
        close_field(p);
        s = eat_eol(p, q, end);
        p->state = ST_START;
        continue;
      }
      default: /* ST_SKIP */
        q = find_eol(&sc, s);
        if (q == NULL) {
          s = end;
          continue;
        }
        s = eat_eol(p, q, end);
        p->state = ST_START;
        continue;
    }
  }
  if (mark) p->pending = (size_t)(end - mark);
  else p->pending += (size_t)(end - start);
  return 0;
}

int slm_sse_feed(slm_sse *p, const char *buf, size_t len,
                 slm_sse_on_event on_event, void *ud) {
  const char *s = buf, *end = buf + len;
  if (p->err) return p->err;
  while (p->bom >= 0 && s < end) { /* one BOM, only at the stream start */
    if ((unsigned char)*s == BOM[p->bom]) {
      s++;
      if (++p->bom == 3) p->bom = -1;
    } else {
      int held = p->bom;
      p->bom = -1;
      if (held && run(p, (const char *)BOM, (const char *)BOM + held,
                      on_event, ud) != 0)
        return p->err;
    }
  }
  if (s < end && run(p, s, end, on_event, ud) != 0) return p->err;
  return SLM_SSE_OK;
}

/* ---- the chat.completion.chunk fast path ------------------------------- */

/* A strict, non-allocating, non-recursive JSON reader over one event's data;
 * what it accepts is described in sse.h (slm_sse_chat_text).  Every function
 * returns 0 on anything it does not accept, and the whole answer is then 0:
 * the caller falls back to a full decoder. */
typedef struct jcur {
  const unsigned char *s, *e;
} jcur;

/* Byte classes: J_PLAIN bytes need no attention inside a string (all but
 * '"', '\\' and the controls below 0x20), J_WS is JSON whitespace. */
enum { J_PLAIN = 1, J_WS = 2 };
#define J16(x) x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x
static const unsigned char jclass[256] = {
  0, 0, 0, 0, 0, 0, 0, 0, 0, J_WS, J_WS, 0, 0, J_WS, 0, 0,   /* 0x00: \t \n \r */
  J16(0),                                                      /* 0x10 */
  J_PLAIN | J_WS, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, /* 0x20: ' ' '"' */
  J16(1), J16(1),                                              /* 0x30, 0x40 */
  1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1,              /* 0x50: '\\' */
  J16(1), J16(1),                                              /* 0x60, 0x70 */
  J16(1), J16(1), J16(1), J16(1), J16(1), J16(1), J16(1), J16(1) /* 0x80-0xFF */
};
#undef J16

static void jws(jcur *c) {
  while (c->s < c->e && (jclass[*c->s] & J_WS)) c->s++;
}

/* Whitespace, then the byte ch. */
static int jeat(jcur *c, unsigned char ch) {
  jws(c);
  if (c->s < c->e && *c->s == ch) {
    c->s++;
    return 1;
  }
  return 0;
}

static int jlit(jcur *c, const char *w, size_t n) {
  if ((size_t)(c->e - c->s) < n || memcmp(c->s, w, n) != 0) return 0;
  c->s += n;
  return 1;
}

static int jnull(jcur *c) {
  jws(c);
  return jlit(c, "null", 4);
}

static int hex4(const unsigned char *p, unsigned *v) {
  unsigned x = 0;
  int i;
  for (i = 0; i < 4; i++) {
    unsigned ch = p[i], d;
    if (ch - '0' < 10) d = ch - '0';
    else if ((ch | 0x20) - 'a' < 6) d = (ch | 0x20) - 'a' + 10;
    else return 0;
    x = x << 4 | d;
  }
  *v = x;
  return 1;
}

/* The string at c->s (a '"'): checks it and moves past its closing quote;
 * *str, *len: the bytes between the quotes; *esc: they hold an escape. */
static int jstring(jcur *c, const unsigned char **str, size_t *len, int *esc) {
  const unsigned char *p = c->s + 1, *e = c->e;
  int has = 0;
  for (;;) {
    while (p < e && (jclass[*p] & J_PLAIN)) p++;
    if (p == e || *p < 0x20) return 0;
    if (*p == '"') break;
    has = 1; /* a backslash */
    if (e - p < 2) return 0;
    switch (p[1]) {
      case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
        p += 2;
        break;
      case 'u': {
        unsigned u, lo;
        if (e - p < 6 || !hex4(p + 2, &u)) return 0;
        p += 6;
        if (u >= 0xDC00 && u <= 0xDFFF) return 0; /* low surrogate first */
        if (u >= 0xD800 && u <= 0xDBFF) {          /* needs its low half */
          if (e - p < 6 || p[0] != '\\' || p[1] != 'u' || !hex4(p + 2, &lo) ||
              lo < 0xDC00 || lo > 0xDFFF)
            return 0;
          p += 6;
        }
        break;
      }
      default:
        return 0;
    }
  }
  *str = c->s + 1;
  *len = (size_t)(p - (c->s + 1));
  *esc = has;
  c->s = p + 1;
  return 1;
}

static int jdigits(jcur *c) {
  const unsigned char *p = c->s;
  while (c->s < c->e && (unsigned)(*c->s - '0') < 10) c->s++;
  return c->s > p;
}

/* An RFC 8259 number, nothing laxer. */
static int jnumber(jcur *c) {
  if (c->s < c->e && *c->s == '-') c->s++;
  if (c->s < c->e && *c->s == '0') c->s++;
  else if (!jdigits(c)) return 0;
  if (c->s < c->e && *c->s == '.') {
    c->s++;
    if (!jdigits(c)) return 0;
  }
  if (c->s < c->e && (*c->s == 'e' || *c->s == 'E')) {
    c->s++;
    if (c->s < c->e && (*c->s == '+' || *c->s == '-')) c->s++;
    if (!jdigits(c)) return 0;
  }
  return 1;
}

/* A member name (escapes allowed: it is skipped) and its colon. */
static int jname(jcur *c) {
  const unsigned char *str;
  size_t n;
  int esc;
  jws(c);
  return c->s < c->e && *c->s == '"' && jstring(c, &str, &n, &esc) && jeat(c, ':');
}

/* Skips one value, containers included, with an explicit stack: at most
 * SLM_CHAT_MAX_DEPTH levels, deeper values are refused. */
static int jskip(jcur *c) {
  unsigned char close[SLM_CHAT_MAX_DEPTH]; /* closing byte of each open level */
  int depth = 0;
  const unsigned char *str;
  size_t n;
  int esc;
  for (;;) {
    jws(c); /* a value starts here */
    if (c->s == c->e) return 0;
    switch (*c->s) {
      case '{':
      case '[':
        if (depth == SLM_CHAT_MAX_DEPTH) return 0;
        close[depth++] = *c->s == '{' ? '}' : ']';
        c->s++;
        jws(c);
        if (c->s < c->e && *c->s == close[depth - 1]) { /* empty */
          c->s++;
          depth--;
          break;
        }
        if (close[depth - 1] == '}' && !jname(c)) return 0;
        continue;
      case '"':
        if (!jstring(c, &str, &n, &esc)) return 0;
        break;
      case 't':
        if (!jlit(c, "true", 4)) return 0;
        break;
      case 'f':
        if (!jlit(c, "false", 5)) return 0;
        break;
      case 'n':
        if (!jlit(c, "null", 4)) return 0;
        break;
      default:
        if (!jnumber(c)) return 0;
        break;
    }
    /* a value ended: close levels until one continues */
    for (;;) {
      if (depth == 0) return 1;
      jws(c);
      if (c->s == c->e) return 0;
      if (*c->s == close[depth - 1]) {
        c->s++;
        depth--;
        continue;
      }
      if (*c->s != ',') return 0;
      c->s++;
      if (close[depth - 1] == '}' && !jname(c)) return 0;
      break;
    }
  }
}

/* The three objects whose members we look at: the opening brace (1: a
 * member follows, 0: empty, -1: not an object), a member name without
 * escapes and its colon, and what follows a member's value (1: another
 * member, 0: the object closed, -1: anything else). */
static int jobj_open(jcur *c) {
  if (!jeat(c, '{')) return -1;
  jws(c);
  if (c->s < c->e && *c->s == '}') {
    c->s++;
    return 0;
  }
  return 1;
}

static int jkey(jcur *c, const unsigned char **k, size_t *kn) {
  const unsigned char *p;
  jws(c);
  p = c->s;
  if (p == c->e || *p != '"') return 0;
  *k = ++p;
  while (p < c->e && (jclass[*p] & J_PLAIN)) p++;
  if (p == c->e || *p != '"') return 0; /* an escape (or worse): not ours */
  *kn = (size_t)(p - *k);
  c->s = p + 1;
  return jeat(c, ':');
}

static int jobj_next(jcur *c) {
  jws(c);
  if (c->s < c->e) {
    if (*c->s == ',') {
      c->s++;
      return 1;
    }
    if (*c->s == '}') {
      c->s++;
      return 0;
    }
  }
  return -1;
}

#define KEY(lit) (kn == sizeof(lit) - 1 && memcmp(k, lit, sizeof(lit) - 1) == 0)

/* What has been seen so far (jrun.state). */
enum { S_CHOICES = 1, S_INDEX = 2, S_DELTA = 4, S_CONTENT = 8 };

/* One run of the reader over a chunk.  The member loops below can start at
 * an object's first member (after = 0) or just after a member's value
 * (after = 1); the latter lets a run resume right after the content string
 * (slm_sse_chat_text's prefix cache). */
typedef struct jrun {
  jcur c;
  const unsigned char *data;
  unsigned known, state;
  size_t at;    /* offset of the content's opening quote */
  unsigned snap; /* state just after the content */
  const unsigned char *text;
  size_t text_len;
  int esc;
} jrun;

/* The bit of a top-level field the accumulator captures once, else 0. */
static unsigned jcaptured(const unsigned char *k, size_t kn) {
  if (KEY("id")) return SLM_CHAT_ID;
  if (KEY("created")) return SLM_CHAT_CREATED;
  if (KEY("model")) return SLM_CHAT_MODEL;
  if (KEY("system_fingerprint")) return SLM_CHAT_FINGERPRINT;
  return 0;
}

static int jcontent(jrun *r) {
  jws(&r->c);
  if ((r->state & S_CONTENT) || r->c.s == r->c.e || *r->c.s != '"') return 0;
  r->at = (size_t)(r->c.s - r->data);
  if (!jstring(&r->c, &r->text, &r->text_len, &r->esc)) return 0;
  r->state |= S_CONTENT;
  r->snap = r->state;
  return 1;
}

static int jdelta(jrun *r, int after) {
  const unsigned char *k;
  size_t kn;
  int m = after ? jobj_next(&r->c) : 1;
  while (m > 0) {
    if (!jkey(&r->c, &k, &kn)) return 0;
    if (KEY("content")) {
      if (!jcontent(r)) return 0;
    } else if (KEY("role") || KEY("refusal") || KEY("tool_calls") || KEY("reasoning") ||
               KEY("reasoning_content")) {
      if (!jnull(&r->c)) return 0;
    } else if (!jskip(&r->c)) {
      return 0;
    }
    m = jobj_next(&r->c);
  }
  return m == 0 && (r->state & S_CONTENT);
}

static int jchoice(jrun *r, int after) {
  const unsigned char *k;
  size_t kn;
  int m = after ? jobj_next(&r->c) : 1;
  while (m > 0) {
    if (!jkey(&r->c, &k, &kn)) return 0;
    if (KEY("index")) {
      /* the literal 0: jobj_next then refuses 0.5, 01, 0e1 */
      if ((r->state & S_INDEX) || !jeat(&r->c, '0')) return 0;
      r->state |= S_INDEX;
    } else if (KEY("delta")) {
      if ((r->state & S_DELTA) || jobj_open(&r->c) != 1 || !jdelta(r, 0)) return 0;
      r->state |= S_DELTA;
    } else if (KEY("finish_reason") || KEY("logprobs")) {
      /* logprobs are folded by the accumulator: such a chunk goes there */
      if (!jnull(&r->c)) return 0;
    } else if (!jskip(&r->c)) {
      return 0;
    }
    m = jobj_next(&r->c);
  }
  return m == 0 && (r->state & S_INDEX) && (r->state & S_DELTA);
}

static int jtop(jrun *r, int after) {
  const unsigned char *k;
  size_t kn;
  unsigned bit;
  int m = after ? jobj_next(&r->c) : 1;
  while (m > 0) {
    if (!jkey(&r->c, &k, &kn)) return 0;
    if (KEY("choices")) {
      if ((r->state & S_CHOICES) || !jeat(&r->c, '[') || jobj_open(&r->c) != 1 ||
          !jchoice(r, 0) || !jeat(&r->c, ']'))
        return 0;
      r->state |= S_CHOICES;
    } else if (KEY("usage") || KEY("error")) {
      if (!jnull(&r->c)) return 0;
    } else if ((bit = jcaptured(k, kn)) != 0 && !(r->known & bit)) {
      if (!jnull(&r->c)) return 0;
    } else if (!jskip(&r->c)) {
      return 0;
    }
    m = jobj_next(&r->c);
  }
  if (m != 0 || !(r->state & S_CHOICES)) return 0;
  jws(&r->c);
  return r->c.s == r->c.e;
}

/* The rest of a chunk after its content string, in the state snap. */
static int jresume(jrun *r) {
  if (!jdelta(r, 1)) return 0;
  r->state |= S_DELTA;
  if (!jchoice(r, 1) || !jeat(&r->c, ']')) return 0;
  r->state |= S_CHOICES;
  return jtop(r, 1);
}

/* Decodes the escapes of an already checked string into b. */
static int junescape(slm_sse_buf *b, const unsigned char *s, size_t n) {
  const unsigned char *e = s + n;
  char *o;
  b->len = 0;
  if (buf_reserve(b, n) != 0) return 0; /* the result is never longer */
  o = b->p;
  while (s < e) {
    unsigned u = 0, lo = 0;
    if (*s != '\\') {
      *o++ = (char)*s++;
      continue;
    }
    switch (s[1]) {
      case 'b': *o++ = '\b'; break;
      case 'f': *o++ = '\f'; break;
      case 'n': *o++ = '\n'; break;
      case 'r': *o++ = '\r'; break;
      case 't': *o++ = '\t'; break;
      case 'u':
        (void)hex4(s + 2, &u);
        if (u >= 0xD800 && u <= 0xDBFF) { /* jstring saw the low half */
          (void)hex4(s + 8, &lo);
          u = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
          s += 6;
        }
        if (u < 0x80) {
          *o++ = (char)u;
        } else if (u < 0x800) {
          *o++ = (char)(0xC0 | u >> 6);
          *o++ = (char)(0x80 | (u & 0x3F));
        } else if (u < 0x10000) {
          *o++ = (char)(0xE0 | u >> 12);
          *o++ = (char)(0x80 | (u >> 6 & 0x3F));
          *o++ = (char)(0x80 | (u & 0x3F));
        } else {
          *o++ = (char)(0xF0 | u >> 18);
          *o++ = (char)(0x80 | (u >> 12 & 0x3F));
          *o++ = (char)(0x80 | (u >> 6 & 0x3F));
          *o++ = (char)(0x80 | (u & 0x3F));
        }
        s += 4;
        break;
      default: /* " \ / */
        *o++ = (char)s[1];
        break;
    }
    s += 2;
  }
  b->len = (size_t)(o - b->p);
  return 1;
}

void slm_sse_chat_free(slm_sse_chat *ch) {
  buf_free(&ch->text);
  buf_free(&ch->prefix);
  memset(ch, 0, sizeof *ch);
}

int slm_sse_chat_text(slm_sse_chat *ch, const char *data, size_t len, unsigned known,
                      const char **text, size_t *text_len) {
  jrun r;
  size_t pre = ch->prefix.len;
  memset(&r, 0, sizeof r);
  r.data = (const unsigned char *)data;
  r.c.s = r.data;
  r.c.e = r.data + len;
  r.known = known;
  /* The bytes before the content are those of the last chunk accepted: the
   * reader would go through them exactly as it did then (the same known
   * bits or more), so it resumes at the content string. */
  if (pre && len > pre && (ch->known & ~known) == 0 && memcmp(data, ch->prefix.p, pre) == 0) {
    r.c.s = r.data + pre - 1;
    if (!jstring(&r.c, &r.text, &r.text_len, &r.esc)) return 0;
    r.state = ch->state;
    if (!jresume(&r)) return 0;
  } else {
    if (jobj_open(&r.c) != 1 || !jtop(&r, 0)) return 0;
    ch->prefix.len = 0;
    if (r.at < SLM_CHAT_MAX_PREFIX && buf_reserve(&ch->prefix, r.at + 1) == 0) {
      memcpy(ch->prefix.p, data, r.at + 1);
      ch->prefix.len = r.at + 1;
      ch->known = known;
      ch->state = r.snap;
    }
  }
  if (r.esc) {
    if (!junescape(&ch->text, r.text, r.text_len)) return 0;
    *text = ch->text.p;
    *text_len = ch->text.len;
  } else {
    *text = (const char *)r.text;
    *text_len = r.text_len;
  }
  return 1;
}

#undef KEY

/* ---- Lua binding ------------------------------------------------------- */

#define SSE_MT "slm.SSEParser"

/* Stack slots used by feed and feed_chat: arguments 1-4 (the chunk
 * metatable of feed_chat at 4), then the events array and the strings
 * pushed once per call, so building an event costs no string interning. */
enum { S_CHUNK_MT = 4, S_LIST, S_KDATA, S_KEVENT, S_KID, S_MESSAGE, S_KRAW };

/* Event tables wait on the stack and go into the events array in batches,
 * so the array is created at its final size instead of growing. */
#define BATCH 512

typedef struct emit_ctx {
  lua_State *L;
  int n;          /* events stored in the array */
  int waiting;    /* values on top of the stack */
  slm_sse *p;     /* feed_chat: the parser (its text buffer) */
  unsigned known; /* feed_chat: SLM_CHAT_* bits */
  int chunks;     /* feed_chat: make the lazy chunks */
  int slow;       /* feed_chat: events that came as event tables */
} emit_ctx;

static void flush_events(emit_ctx *c) {
  lua_State *L = c->L;
  int i;
  if (lua_isnil(L, S_LIST)) {
    lua_createtable(L, c->waiting, 0);
    lua_replace(L, S_LIST);
  }
  for (i = c->waiting; i >= 1; i--) slm_rawseti(L, S_LIST, c->n + i);
  c->n += c->waiting;
  c->waiting = 0;
}

/* Room for two more values on the stack. */
static void make_room(emit_ctx *c) {
  if (c->waiting >= BATCH - 1 || !lua_checkstack(c->L, 4)) flush_events(c);
}

static void emit_lua(void *ud, const slm_sse_event *ev) {
  emit_ctx *c = (emit_ctx *)ud;
  lua_State *L = c->L;
  make_room(c);
  lua_createtable(L, 0, ev->id ? 3 : 2);
  lua_pushvalue(L, S_KDATA);
  lua_pushlstring(L, ev->data, ev->data_len);
  lua_rawset(L, -3);
  lua_pushvalue(L, S_KEVENT);
  if (ev->type_len == 7 && memcmp(ev->type, "message", 7) == 0)
    lua_pushvalue(L, S_MESSAGE);
  else
    lua_pushlstring(L, ev->type, ev->type_len);
  lua_rawset(L, -3);
  if (ev->id) {
    lua_pushvalue(L, S_KID);
    lua_pushlstring(L, ev->id, ev->id_len);
    lua_rawset(L, -3);
  }
  c->waiting++;
}

/* feed_chat: every event is a pair of values, see l_feed_chat. */
static void emit_chat(void *ud, const slm_sse_event *ev) {
  emit_ctx *c = (emit_ctx *)ud;
  lua_State *L = c->L;
  const char *text;
  size_t len;
  if (ev->type_len == 7 && memcmp(ev->type, "message", 7) == 0 &&
      slm_sse_chat_text(&c->p->chat, ev->data, ev->data_len, c->known, &text, &len)) {
    make_room(c);
    lua_pushlstring(L, text, len);
    if (c->chunks) {
      lua_createtable(L, 0, 1);
      lua_pushvalue(L, S_KRAW);
      lua_pushlstring(L, ev->data, ev->data_len);
      lua_rawset(L, -3);
      lua_pushvalue(L, S_CHUNK_MT);
      lua_setmetatable(L, -2);
    } else {
      lua_pushboolean(L, 0);
    }
    c->waiting += 2;
  } else {
    make_room(c);
    lua_pushboolean(L, 0);
    c->waiting++;
    emit_lua(ud, ev);
    c->slow++;
  }
}

/* The userdata: the parser, and whether a feed of it is running.  Lua code
 * can run in the middle of a feed without being called by it: a __gc
 * finalizer, run by a collection step inside one of the allocations that
 * build the events.  While the events are built, the parser's buffers hold
 * the bytes being copied, so such code must not free or refill them: it
 * cannot feed, finish or reset the parser then (an error), and closing it
 * waits until the feed returns. */
typedef struct lua_sse {
  slm_sse p;        /* first: check_parser's pointer is both */
  int busy;         /* a feed is running (cleared however it ends: see feed_with) */
  int close_later;  /* close() came during that feed */
  slm_sse_on_event on_event;
  emit_ctx *ctx;
} lua_sse;

static slm_sse *check_parser(lua_State *L) {
  return (slm_sse *)luaL_checkudata(L, 1, SSE_MT);
}

/* The parser at 1, which must not be in a feed (what = the method). */
static slm_sse *check_idle(lua_State *L, const char *what) {
  lua_sse *w = (lua_sse *)luaL_checkudata(L, 1, SSE_MT);
  if (w->busy)
    luaL_error(L, "slm.core: cannot %s an SSE parser during its own feed (from a __gc finalizer?)", what);
  return &w->p;
}

/* nil, message [, events dispatched before the failure] */
static int push_error(lua_State *L, const slm_sse *p, int events) {
  lua_pushnil(L);
  if (p->err == SLM_SSE_ETOOBIG) {
    char n[32];
    snprintf(n, sizeof n, "%llu", (unsigned long long)p->max_event);
    lua_pushfstring(L, "sse: event exceeds max_event (%s bytes)", n);
  } else
    lua_pushliteral(L, "sse: out of memory");
  if (events == 0) return 2;
  lua_pushvalue(L, events);
  return 3;
}

static void check_bytes(lua_State *L) {
  if (lua_type(L, 2) != LUA_TSTRING)
    luaL_argerror(L, 2, lua_pushfstring(L, "string expected, got %s", luaL_typename(L, 2)));
}

/* The body of feed_with, under lua_pcall: arguments 1-4 as the method got
 * them (nils for those it did not), the parser's state in its userdata. */
static int feed_run(lua_State *L) {
  lua_sse *w = (lua_sse *)lua_touserdata(L, 1);
  slm_sse *p = &w->p;
  emit_ctx *c = w->ctx;
  size_t len;
  const char *s = lua_tolstring(L, 2, &len);
  int rc;
  lua_settop(L, S_CHUNK_MT);
  lua_pushnil(L); /* S_LIST: the events array, made at the first flush */
  lua_pushliteral(L, "data");
  lua_pushliteral(L, "event");
  lua_pushliteral(L, "id");
  lua_pushliteral(L, "message");
  lua_pushliteral(L, "__slm_raw");
  c->L = L;
  c->n = 0;
  c->waiting = 0;
  c->p = p;
  rc = slm_sse_feed(p, s, len, w->on_event, c);
  flush_events(c);
  if (rc != SLM_SSE_OK) return push_error(L, p, S_LIST);
  lua_settop(L, S_LIST);
  return 1;
}

/* Feeds the string at index 2 to p, collecting what on_event pushes into
 * one array: events | nil, err, events_before_the_failure.  The work runs
 * under lua_pcall, so that the parser is marked idle again however it ends
 * (a memory error, an error raised by a finalizer under LuaJIT), and a
 * close() that came meanwhile is done then. */
static int feed_with(lua_State *L, slm_sse *p, slm_sse_on_event on_event, emit_ctx *c) {
  lua_sse *w = (lua_sse *)p;
  int rc;
  if (w->busy)
    return luaL_error(L, "slm.core: cannot feed an SSE parser during its own feed (from a __gc finalizer?)");
  if (p->err) return push_error(L, p, 0);
  lua_settop(L, S_CHUNK_MT);
  lua_pushcfunction(L, feed_run);
  lua_insert(L, 1);
  w->busy = 1;
  w->on_event = on_event;
  w->ctx = c;
  rc = lua_pcall(L, S_CHUNK_MT, LUA_MULTRET, 0);
  w->busy = 0;
  w->ctx = NULL;
  if (w->close_later) {
    w->close_later = 0;
    slm_sse_free(p);
  }
  if (rc != LUA_OK) return lua_error(L);
  return lua_gettop(L);
}

/* p:feed(bytes) -> events | nil, err, events_before_the_failure */
static int l_feed(lua_State *L) {
  slm_sse *p = check_parser(L);
  emit_ctx c;
  check_bytes(L);
  memset(&c, 0, sizeof c);
  return feed_with(L, p, emit_lua, &c);
}

/* p:feed_chat(bytes, known [, chunk_mt]) -> pairs, nslow
 *                                         | nil, err, pairs_before_the_failure
 * Like feed, but the array holds two values per event: a "message" event
 * that is a plain content-only chat.completion.chunk of choice 0
 * (slm_sse_chat_text in sse.h; known: its SLM_CHAT_* bits) as its content
 * string and its chunk, any other event as false and its event table;
 * nslow counts the latter.  The chunk is false, or, when chunk_mt is a
 * table, setmetatable({ __slm_raw = data }, chunk_mt) for the caller to
 * decode when asked. */
static int l_feed_chat(lua_State *L) {
  slm_sse *p = check_parser(L);
  lua_Integer known;
  emit_ctx c;
  int n;
  check_bytes(L);
  known = luaL_checkinteger(L, 3);
  luaL_argcheck(L, known >= 0 && known <= 15, 3, "known must be an integer in 0..15");
  if (!lua_isnoneornil(L, 4)) luaL_checktype(L, 4, LUA_TTABLE);
  memset(&c, 0, sizeof c);
  c.known = (unsigned)known;
  c.chunks = lua_istable(L, 4);
  n = feed_with(L, p, emit_chat, &c);
  if (n != 1) return n; /* the failure */
  lua_pushinteger(L, c.slow);
  return 2;
}

/* p:finish() -> bytes discarded */
static int l_finish(lua_State *L) {
  slm_sse *p = check_idle(L, "finish");
  lua_pushinteger(L, (lua_Integer)slm_sse_finish(p));
  return 1;
}

static int l_last_id(lua_State *L) {
  slm_sse *p = check_parser(L);
  size_t len;
  const char *id = slm_sse_last_id(p, &len);
  if (id) lua_pushlstring(L, id, len);
  else lua_pushnil(L);
  return 1;
}

static int l_retry(lua_State *L) {
  slm_sse *p = check_parser(L);
  long long ms;
  if (slm_sse_retry(p, &ms)) lua_pushinteger(L, (lua_Integer)ms);
  else lua_pushnil(L);
  return 1;
}

static int l_reset(lua_State *L) {
  slm_sse_reset(check_idle(L, "reset"));
  lua_settop(L, 1);
  return 1;
}

/* __gc and __close: frees the buffers; the parser stays usable (empty).
 * During a feed of the parser (a finalizer's call) that waits for its end. */
static int l_gc(lua_State *L) {
  lua_sse *w = (lua_sse *)luaL_checkudata(L, 1, SSE_MT);
  if (w->busy) w->close_later = 1;
  else slm_sse_free(&w->p);
  return 0;
}

static int l_tostring(lua_State *L) {
  lua_pushfstring(L, SSE_MT " (%p)", lua_topointer(L, 1));
  return 1;
}

/* core.sse_parser([{ max_event = bytes, error_field = bool }]) */
static int l_new(lua_State *L) {
  size_t max_event = SLM_SSE_DEFAULT_MAX_EVENT;
  int error_field = 0;
  lua_sse *w;
  slm_sse *p;
  if (!lua_isnoneornil(L, 1)) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_pushnil(L);
    while (lua_next(L, 1)) {
      const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
      if (k && strcmp(k, "max_event") == 0) {
        lua_Number n = lua_tonumber(L, -1);
        if (lua_type(L, -1) != LUA_TNUMBER || !(n >= 1 && n <= 9007199254740991.0) ||
            n != (lua_Number)(long long)n)
          return luaL_argerror(L, 1, "max_event must be a positive integer");
        max_event = (size_t)n;
      } else if (k && strcmp(k, "error_field") == 0) {
        if (lua_type(L, -1) != LUA_TBOOLEAN) return luaL_argerror(L, 1, "error_field must be a boolean");
        error_field = lua_toboolean(L, -1);
      } else {
        return luaL_argerror(L, 1, k ? lua_pushfstring(L, "unknown option '%s'", k)
                                     : "option names must be strings");
      }
      lua_pop(L, 1);
    }
  }
  w = (lua_sse *)slm_newuserdata(L, sizeof *w);
  memset(w, 0, sizeof *w);
  p = &w->p;
  slm_sse_init(p, max_event);
  slm_sse_error_field(p, error_field);
  luaL_setmetatable(L, SSE_MT);
  return 1;
}

int slm_open_sse(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"feed", l_feed}, {"feed_chat", l_feed_chat}, {"finish", l_finish}, {"last_id", l_last_id},
    {"retry", l_retry}, {"reset", l_reset}, {"close", l_gc}, {NULL, NULL}
  };
  static const luaL_Reg fns[] = {{"sse_parser", l_new}, {NULL, NULL}};
  if (luaL_newmetatable(L, SSE_MT)) {
    lua_createtable(L, 0, 8);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, l_gc);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, l_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
  luaL_setfuncs(L, fns, 0);
  return 0;
}
