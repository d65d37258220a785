/*
 * csv.c - RFC 4180 CSV: the incremental record parser (any chunk
 * boundaries, every record reported with its line), the quoting of fields
 * for writers, and their Lua binding (core.csv_parser, core.csv_format).
 * The rules are in csv.h.
 */
#include <stdlib.h>
#include <string.h>

#include "slm.h"
#include "csv.h"

/* Parser states */
enum {
  REC_START,   /* between records (an LF here is an empty line) */
  REC_CR,      /* a CR at the start of a record */
  FIELD_START, /* at the start of a field of a started record */
  UNQUOTED,    /* inside an unquoted field */
  QUOTED,      /* inside a quoted field */
  QUOTE,       /* a quote inside a quoted field: closing, or the first of "" */
  CR_UNQ,      /* a CR after unquoted text: a line end if LF follows, else data */
  CR_END,      /* a CR after a closing quote: must be followed by LF */
  SKIP         /* a malformed record: skipping to the end of its line */
};

/* cls bits: special bytes in unquoted text, in quoted text */
#define C_UNQ 1u
#define C_QUO 2u

static const unsigned char BOM[3] = {0xEF, 0xBB, 0xBF};

static void reset_stream(slm_csv *p) {
  p->len = 0;
  p->nfields = 0;
  p->field_start = 0;
  p->line = 1;
  p->rec_line = 1;
  p->quote_line = 1;
  p->records = 0;
  p->err = SLM_CSV_OK;
  p->state = REC_START;
  p->bom = p->strip_bom ? 0 : -1;
}

void slm_csv_init(slm_csv *p, unsigned char sep, int strip_bom, size_t max_record) {
  memset(p, 0, sizeof *p);
  p->sep = sep;
  p->strip_bom = strip_bom;
  p->max_record = max_record;
  p->cls[sep] |= C_UNQ;
  p->cls['"'] |= C_UNQ | C_QUO;
  p->cls['\r'] |= C_UNQ;
  p->cls['\n'] |= C_UNQ | C_QUO;
  reset_stream(p);
}

void slm_csv_free(slm_csv *p) {
  unsigned char sep = p->sep;
  int strip_bom = p->strip_bom;
  size_t max_record = p->max_record;
  free(p->data);
  free(p->ends);
  slm_csv_init(p, sep, strip_bom, max_record);
}

static int grow(void **pp, size_t *cap, size_t need, size_t elem) {
  size_t ncap = *cap ? *cap : 64;
  void *np;
  while (ncap < need) {
    if (ncap > ((size_t)-1) / 2 / elem) return 0;
    ncap *= 2;
  }
  np = realloc(*pp, ncap * elem);
  if (!np) return 0;
  *pp = np;
  *cap = ncap;
  return 1;
}

/* Records the fault of the current record (the first one only); `bad` is the
 * byte at fault (NULL: none), kept at the end of the excerpt. */
static void fault(slm_csv *p, int code, const char *bad) {
  size_t n, room = SLM_CSV_EXCERPT - (bad ? 1 : 0);
  if (p->err) return;
  p->err = code;
  p->err_line = code == SLM_CSV_EUNTERMINATED ? p->quote_line : p->line;
  p->err_field = p->nfields + 1;
  n = p->len - p->field_start;
  if (n > room) n = room;
  if (n) memcpy(p->excerpt, p->data + p->len - n, n);
  if (bad) p->excerpt[n++] = *bad;
  p->excerpt_len = n;
}

static int append(slm_csv *p, const char *s, size_t n) {
  if (p->err) return 1;
  if (p->max_record && n > p->max_record - p->len) {
    /* keep what fits, so that the excerpt does not depend on the chunks */
    size_t fit = p->max_record - p->len;
    if (fit && !append(p, s, fit)) return 0;
    fault(p, SLM_CSV_ETOOBIG, NULL);
    return 1;
  }
  if (p->len + n > p->cap && !grow((void **)&p->data, &p->cap, p->len + n, 1)) {
    p->nomem = 1;
    return 0;
  }
  memcpy(p->data + p->len, s, n);
  p->len += n;
  return 1;
}

static int end_field(slm_csv *p) {
  if (p->err) return 1;
  if (p->nfields == p->fcap && !grow((void **)&p->ends, &p->fcap, p->nfields + 1, sizeof *p->ends)) {
    p->nomem = 1;
    return 0;
  }
  p->ends[p->nfields++] = p->len;
  p->field_start = p->len;
  return 1;
}

static void emit(slm_csv *p, slm_csv_on_record on_record, void *ud) {
  slm_csv_record r;
  r.data = p->data ? p->data : ""; /* never NULL: callers add offsets to it */
  r.ends = p->ends;
  r.nfields = p->err ? 0 : p->nfields;
  r.line = p->rec_line;
  r.record = ++p->records;
  r.err = p->err;
  r.err_line = p->err_line;
  r.err_field = p->err_field;
  r.excerpt = p->excerpt;
  r.excerpt_len = p->err ? p->excerpt_len : 0;
  on_record(ud, &r);
  p->len = 0;
  p->nfields = 0;
  p->field_start = 0;
  p->err = SLM_CSV_OK;
}

/* A line end outside quotes: the field and the record end; 0 when out of memory. */
static int end_record(slm_csv *p, slm_csv_on_record on_record, void *ud) {
  if (!end_field(p)) return 0;
  emit(p, on_record, ud);
  p->line++;
  return 1;
}

static void start_record(slm_csv *p) {
  p->rec_line = p->line;
  p->len = 0;
  p->nfields = 0;
  p->field_start = 0;
  p->err = SLM_CSV_OK;
  p->state = FIELD_START;
}

/* The state machine over [s, end); 0 when out of memory. */
static int run(slm_csv *p, const char *s, const char *end, slm_csv_on_record on_record, void *ud) {
  const unsigned char *cls = p->cls;
  const unsigned char sep = p->sep;
  int st = p->state;
  while (s < end) {
    unsigned char c = (unsigned char)*s;
    switch (st) {
    case REC_START:
      if (c == '\n') { p->line++; s++; break; }
      if (c == '\r') { st = REC_CR; s++; break; }
      start_record(p);
      st = FIELD_START;
      break;
    case REC_CR:
      if (c == '\n') { p->line++; s++; st = REC_START; break; }
      start_record(p); /* the CR was data of the first field */
      if (!append(p, "\r", 1)) goto oom;
      st = UNQUOTED;
      break;
    case FIELD_START:
      if (c == '"') { p->quote_line = p->line; st = QUOTED; s++; break; }
      st = UNQUOTED; /* an empty or unquoted field */
      break;
    case UNQUOTED: {
      const char *q = s;
      while (q < end && !(cls[(unsigned char)*q] & C_UNQ)) q++;
      if (q > s && !append(p, s, (size_t)(q - s))) goto oom;
      s = q;
      if (s == end) break;
      c = (unsigned char)*s++;
      if (c == sep) {
        if (!end_field(p)) goto oom;
        st = FIELD_START;
      } else if (c == '\n') {
        if (!end_record(p, on_record, ud)) goto oom;
        st = REC_START;
      } else if (c == '\r') {
        st = CR_UNQ;
      } else { /* a quote */
        fault(p, SLM_CSV_EQUOTE, s - 1);
        st = SKIP;
      }
      break;
    }
    case QUOTED: {
      const char *q = s;
      while (q < end && !(cls[(unsigned char)*q] & C_QUO)) q++;
      if (q > s && !append(p, s, (size_t)(q - s))) goto oom;
      s = q;
      if (s == end) break;
      if (*s == '\n') {
        if (!append(p, "\n", 1)) goto oom;
        p->line++;
      } else {
        st = QUOTE;
      }
      s++;
      break;
    }
    case QUOTE:
      if (c == '"') {
        if (!append(p, "\"", 1)) goto oom;
        st = QUOTED;
        s++;
      } else if (c == sep) {
        if (!end_field(p)) goto oom;
        st = FIELD_START;
        s++;
      } else if (c == '\n') {
        if (!end_record(p, on_record, ud)) goto oom;
        st = REC_START;
        s++;
      } else if (c == '\r') {
        st = CR_END;
        s++;
      } else {
        fault(p, SLM_CSV_EAFTERQUOTE, s);
        st = SKIP;
      }
      break;
    case CR_UNQ:
    case CR_END:
      if (c == '\n') {
        if (!end_record(p, on_record, ud)) goto oom;
        st = REC_START;
        s++;
      } else if (st == CR_UNQ) {
        if (!append(p, "\r", 1)) goto oom; /* a bare CR is data */
        st = UNQUOTED;
      } else {
        fault(p, SLM_CSV_EAFTERQUOTE, "\r");
        st = SKIP;
      }
      break;
    default: { /* SKIP */
      const char *q = (const char *)memchr(s, '\n', (size_t)(end - s));
      if (!q) { s = end; break; }
      s = q + 1;
      emit(p, on_record, ud);
      p->line++;
      st = REC_START;
      break;
    }
    }
  }
  p->state = st;
  return 1;
oom:
  p->state = st;
  return 0;
}

int slm_csv_feed(slm_csv *p, const char *buf, size_t len, slm_csv_on_record on_record, void *ud) {
  const char *end = buf + len;
  if (p->nomem) return SLM_CSV_ENOMEM;
  while (p->bom >= 0 && buf < end) {
    if ((unsigned char)*buf == BOM[p->bom]) {
      buf++;
      if (++p->bom == 3) p->bom = -1;
    } else { /* not a BOM: the bytes matched so far are data */
      int n = p->bom;
      p->bom = -1;
      if (!run(p, (const char *)BOM, (const char *)BOM + n, on_record, ud)) return SLM_CSV_ENOMEM;
    }
  }
  if (buf < end && !run(p, buf, end, on_record, ud)) return SLM_CSV_ENOMEM;
  return SLM_CSV_OK;
}

int slm_csv_finish(slm_csv *p, slm_csv_on_record on_record, void *ud) {
  if (p->nomem) return SLM_CSV_ENOMEM;
  if (p->bom > 0) { /* a BOM prefix and nothing else: data */
    int n = p->bom;
    p->bom = -1;
    if (!run(p, (const char *)BOM, (const char *)BOM + n, on_record, ud)) return SLM_CSV_ENOMEM;
  }
  switch (p->state) {
  case REC_START:
  case REC_CR: /* a CR alone at the end: an empty line */
    break;
  case QUOTED:
    fault(p, SLM_CSV_EUNTERMINATED, NULL);
    emit(p, on_record, ud);
    break;
  case SKIP:
    emit(p, on_record, ud);
    break;
  default: /* FIELD_START, UNQUOTED, QUOTE, CR_UNQ, CR_END: the last field ends here */
    if (!end_field(p)) return SLM_CSV_ENOMEM;
    emit(p, on_record, ud);
    break;
  }
  reset_stream(p);
  return SLM_CSV_OK;
}

/* ---- quoting ------------------------------------------------------------ */

int slm_csv_needs_quotes(const char *s, size_t n, unsigned char sep, int alone) {
  size_t i;
  if (n == 0) return alone;
  if (s[0] == ' ' || s[0] == '\t' || s[n - 1] == ' ' || s[n - 1] == '\t') return 1;
  for (i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == sep || c == '"' || c == '\r' || c == '\n') return 1;
  }
  return 0;
}

size_t slm_csv_field_size(const char *s, size_t n, int quoted) {
  size_t i, q = 0;
  if (!quoted) return n;
  for (i = 0; i < n; i++) q += s[i] == '"';
  return n + q + 2;
}

char *slm_csv_put_field(char *out, const char *s, size_t n, int quoted) {
  size_t i;
  if (!quoted) {
    if (n) memcpy(out, s, n);
    return out + n;
  }
  *out++ = '"';
  for (i = 0; i < n; i++) {
    if (s[i] == '"') *out++ = '"';
    *out++ = s[i];
  }
  *out++ = '"';
  return out;
}

/* ---- Lua binding -------------------------------------------------------- */

#define CSV_MT "slm.CSVParser"

/* Stack slots of feed/finish: the parser, the chunk, then these. */
enum { S_LIST = 3, S_KLINE, S_KRECORD };

typedef struct emit_ctx {
  lua_State *L;
  lua_Integer n;
} emit_ctx;

static const char *const ERR_NAMES[] = {
  "ok", "quote", "after_quote", "unterminated", "too_long", "nomem"
};

static void set_int(lua_State *L, const char *k, size_t v) {
  lua_pushinteger(L, (lua_Integer)v);
  lua_setfield(L, -2, k);
}

static void emit_lua(void *ud, const slm_csv_record *r) {
  emit_ctx *c = (emit_ctx *)ud;
  lua_State *L = c->L;
  size_t i, from = 0;
  if (r->err) {
    lua_createtable(L, 0, 6);
    lua_pushstring(L, ERR_NAMES[r->err]);
    lua_setfield(L, -2, "error");
    set_int(L, "err_line", r->err_line);
    set_int(L, "field", r->err_field);
    lua_pushlstring(L, r->excerpt, r->excerpt_len);
    lua_setfield(L, -2, "excerpt");
  } else {
    lua_createtable(L, (int)r->nfields, 2);
    for (i = 0; i < r->nfields; i++) {
      lua_pushlstring(L, r->data + from, r->ends[i] - from);
      slm_rawseti(L, -2, (lua_Integer)i + 1);
      from = r->ends[i];
    }
  }
  lua_pushvalue(L, S_KLINE);
  lua_pushinteger(L, (lua_Integer)r->line);
  lua_rawset(L, -3);
  lua_pushvalue(L, S_KRECORD);
  lua_pushinteger(L, (lua_Integer)r->record);
  lua_rawset(L, -3);
  slm_rawseti(L, S_LIST, ++c->n);
}

/* The userdata: the parser, and whether a feed or finish of it is
 * running.  Lua code can run in the middle of one without being called by
 * it: a __gc finalizer, run by a collection step inside one of the
 * allocations that build the records.  While a record is built, the
 * parser's buffers hold its fields, so such code must not free or refill
 * them: it cannot feed or finish the parser then (an error), and closing
 * it waits until the call returns. */
typedef struct lua_csv {
  slm_csv p;        /* first: check_parser's pointer is both */
  int busy;         /* cleared however the call ends: see run_protected */
  int close_later;  /* close() came during that call */
} lua_csv;

static slm_csv *check_parser(lua_State *L) {
  return (slm_csv *)luaL_checkudata(L, 1, CSV_MT);
}

static void prepare(lua_State *L, emit_ctx *c) {
  lua_settop(L, 2);
  lua_newtable(L);
  lua_pushliteral(L, "line");
  lua_pushliteral(L, "record");
  c->L = L;
  c->n = 0;
}

static int done(lua_State *L, int rc) {
  if (rc != SLM_CSV_OK) return luaL_error(L, "csv: out of memory");
  lua_settop(L, S_LIST);
  return 1;
}

/* Under lua_pcall: the parser, the chunk (nil: finish). */
static int feed_run(lua_State *L) {
  slm_csv *p = (slm_csv *)lua_touserdata(L, 1);
  emit_ctx c;
  size_t len;
  const char *s;
  if (lua_isnil(L, 2)) {
    prepare(L, &c);
    return done(L, slm_csv_finish(p, emit_lua, &c));
  }
  s = lua_tolstring(L, 2, &len);
  prepare(L, &c);
  return done(L, slm_csv_feed(p, s, len, emit_lua, &c));
}

/* feed or finish (chunk at 2, or nil) under lua_pcall, so that the parser
 * is marked idle again however it ends (a memory error, an error raised by
 * a finalizer under LuaJIT); a close() that came meanwhile is done then. */
static int run_protected(lua_State *L, const char *what) {
  lua_csv *w = (lua_csv *)luaL_checkudata(L, 1, CSV_MT);
  int rc;
  if (w->busy)
    return luaL_error(L, "slm.core: cannot %s a CSV parser during its own feed or finish (from a __gc finalizer?)", what);
  lua_settop(L, 2);
  lua_pushcfunction(L, feed_run);
  lua_insert(L, 1);
  w->busy = 1;
  rc = lua_pcall(L, 2, 1, 0);
  w->busy = 0;
  if (w->close_later) {
    w->close_later = 0;
    slm_csv_free(&w->p);
  }
  if (rc != LUA_OK) return lua_error(L);
  return 1;
}

/* p:feed(bytes) -> the records completed: { fields..., line =, record = },
 * or for a malformed one { error = name, err_line =, field =, excerpt =,
 * line =, record = } */
static int l_feed(lua_State *L) {
  check_parser(L);
  luaL_checkstring(L, 2);
  return run_protected(L, "feed");
}

/* p:finish() -> the last records, as feed; the parser starts a new stream */
static int l_finish(lua_State *L) {
  check_parser(L);
  lua_settop(L, 1);
  lua_pushnil(L);
  return run_protected(L, "finish");
}

/* p:line() -> the physical line the parser is on */
static int l_line(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)check_parser(L)->line);
  return 1;
}

/* __gc, __close and close: frees the buffers (the parser stays usable);
 * during a feed or finish of the parser (a finalizer's call) that waits
 * for its end. */
static int l_gc(lua_State *L) {
  lua_csv *w = (lua_csv *)luaL_checkudata(L, 1, CSV_MT);
  if (w->busy) w->close_later = 1;
  else slm_csv_free(&w->p);
  return 0;
}

static int l_tostring(lua_State *L) {
  lua_pushfstring(L, CSV_MT " (%p)", lua_topointer(L, 1));
  return 1;
}

static unsigned char check_sep(lua_State *L, int i) {
  size_t n;
  const char *s = luaL_optlstring(L, i, ",", &n);
  luaL_argcheck(L, n == 1 && s[0] != '"' && s[0] != '\r' && s[0] != '\n', i,
                "the separator must be one byte, not a quote, CR or LF");
  return (unsigned char)s[0];
}

/* core.csv_parser([separator [, strip_bom [, max_record]]]) */
static int l_new(lua_State *L) {
  unsigned char sep = check_sep(L, 1);
  int strip_bom = lua_isnoneornil(L, 2) ? 1 : lua_toboolean(L, 2);
  lua_Integer max_record = luaL_optinteger(L, 3, 0);
  lua_csv *w;
  slm_csv *p;
  luaL_argcheck(L, max_record >= 0, 3, "max_record must be 0 (no limit) or positive");
  w = (lua_csv *)slm_newuserdata(L, sizeof *w);
  memset(w, 0, sizeof *w);
  p = &w->p;
  slm_csv_init(p, sep, strip_bom, (size_t)max_record);
  luaL_setmetatable(L, CSV_MT);
  return 1;
}

/* core.csv_format(fields [, separator [, eol]]) -> one record, eol included.
 * Fields are strings or numbers; the list must not be empty. */
static int l_format(lua_State *L) {
  unsigned char sep;
  size_t eol_len, total, i, n;
  const char *eol;
  char *out, *start;
  int base;
  luaL_checktype(L, 1, LUA_TTABLE);
  sep = check_sep(L, 2);
  eol = luaL_optlstring(L, 3, "\r\n", &eol_len);
  n = (size_t)lua_rawlen(L, 1);
  if (n == 0) return luaL_argerror(L, 1, "a record needs at least one field");
  if (n > 100000 || !lua_checkstack(L, (int)n + 8))
    return luaL_argerror(L, 1, "too many fields");
  /* every field on the stack as a string, then one scratch userdata of the
   * exact size (Lua-owned: nothing leaks if pushing the result raises;
   * LuaJIT has no luaL_buffinitsize) */
  base = lua_gettop(L);
  total = eol_len;
  for (i = 1; i <= n; i++) {
    int t = slm_rawgeti(L, 1, i);
    size_t len;
    const char *s;
    if (t != LUA_TSTRING && t != LUA_TNUMBER)
      return luaL_error(L, "csv: field %d is a %s (strings and numbers only)", (int)i,
                        lua_typename(L, t));
    s = lua_tolstring(L, -1, &len);
    total += slm_csv_field_size(s, len, slm_csv_needs_quotes(s, len, sep, n == 1)) + (i > 1);
  }
  start = out = (char *)slm_newuserdata(L, total);
  for (i = 1; i <= n; i++) {
    size_t len;
    const char *s = lua_tolstring(L, base + (int)i, &len);
    if (i > 1) *out++ = (char)sep;
    out = slm_csv_put_field(out, s, len, slm_csv_needs_quotes(s, len, sep, n == 1));
  }
  memcpy(out, eol, eol_len);
  lua_pushlstring(L, start, total);
  return 1;
}

int slm_open_csv(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"feed", l_feed}, {"finish", l_finish}, {"line", l_line}, {"close", l_gc}, {NULL, NULL}
  };
  static const luaL_Reg fns[] = {{"csv_parser", l_new}, {"csv_format", l_format}, {NULL, NULL}};
  slm_new_class(L, CSV_MT, methods, l_gc, l_tostring);
  luaL_setfuncs(L, fns, 0);
  return 0;
}
