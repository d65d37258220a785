/*
 * csv.h - the C API of the incremental RFC 4180 CSV parser and of the
 * field quoting (csv.c).
 *
 * The parser does no I/O and has no global state; the Lua binding
 * (core.csv_parser, core.csv_format) and the fuzz harness
 * (tests/fuzz/fuzz_csv.c) both sit on this API.
 *
 *   slm_csv p;
 *   slm_csv_init(&p, ',', 1, 64 << 20);            // separator, strip BOM, max record
 *   rc = slm_csv_feed(&p, buf, len, on_record, ud); // any chunk boundaries
 *   rc = slm_csv_finish(&p, on_record, ud);         // end of input
 *   slm_csv_free(&p);                               // idempotent
 *
 * on_record is called once per record, in order, good or bad.  Its pointers
 * are valid only during the call.
 *
 * The rules (README "CSV and JSONL"):
 *   - fields are separated by the separator byte, records end with LF or
 *     CRLF (a CR before the end of input also ends the last record); a CR
 *     not followed by LF inside an unquoted field is data;
 *   - a field that starts with a double quote is quoted: separators, CR, LF
 *     and doubled quotes ("") inside it are data; after its closing quote
 *     only a separator or a record end may follow;
 *   - a line with nothing on it (LF or CRLF alone) outside a quoted field is
 *     not a record: it is skipped, and the line count goes on;
 *   - the last record may end without a line end;
 *   - a UTF-8 byte order mark at the very start is dropped (when asked).
 * Malformed records (SLM_CSV_E*) are reported with err set and no fields:
 *   - a quote inside an unquoted field, or text after a closing quote: the
 *     rest of that physical line is skipped (quotes ignored) and parsing
 *     goes on with the next line;
 *   - a quoted field still open at the end of input: reported by finish;
 *     nothing after its opening quote can be read as records;
 *   - a record longer than max_record bytes of field data: parsing goes on
 *     (without storing) to the end of that record, then the next one.
 */
#ifndef SLM_CSV_H
#define SLM_CSV_H

#include <stddef.h>

#define SLM_CSV_OK 0
#define SLM_CSV_EQUOTE 1       /* a quote inside an unquoted field */
#define SLM_CSV_EAFTERQUOTE 2  /* text after the closing quote of a field */
#define SLM_CSV_EUNTERMINATED 3 /* a quoted field open at the end of input */
#define SLM_CSV_ETOOBIG 4      /* record over max_record bytes */
#define SLM_CSV_ENOMEM 5       /* allocation failed (feed/finish return it; sticky) */

#define SLM_CSV_EXCERPT 24     /* at most this many bytes of excerpt */

typedef struct slm_csv_record {
  const char *data;    /* the field bytes, one after another */
  const size_t *ends;  /* field i is data[i ? ends[i-1] : 0, ends[i]) */
  size_t nfields;      /* 0 when err is set */
  size_t line;         /* physical line (1-based) where the record starts */
  size_t record;       /* 1-based record number, bad records included */
  int err;             /* SLM_CSV_OK or SLM_CSV_E* */
  size_t err_line;     /* line of the fault (the opening quote for EUNTERMINATED) */
  size_t err_field;    /* 1-based field of the fault */
  const char *excerpt; /* the field's last bytes up to the fault, the byte at fault included */
  size_t excerpt_len;
} slm_csv_record;

typedef void (*slm_csv_on_record)(void *ud, const slm_csv_record *r);

typedef struct slm_csv {
  char *data;          /* field bytes of the record being read */
  size_t len, cap;
  size_t *ends;        /* field ends of the record being read */
  size_t nfields, fcap;
  size_t max_record;   /* 0: no limit */
  size_t field_start;  /* offset in data where the current field starts */
  size_t line;         /* current physical line */
  size_t rec_line;     /* line where the current record starts */
  size_t quote_line;   /* line of the opening quote of the current field */
  size_t records;      /* records reported so far */
  size_t err_line, err_field;
  char excerpt[SLM_CSV_EXCERPT];
  size_t excerpt_len;
  int state;           /* csv.c */
  int err;             /* error of the current record */
  int nomem;           /* an allocation failed: sticky, feed and finish return ENOMEM */
  int bom;             /* BOM bytes matched at the stream start; -1 when past it or off */
  int strip_bom;
  unsigned char sep;
  unsigned char cls[256]; /* byte classes of unquoted text (csv.c) */
} slm_csv;

void slm_csv_init(slm_csv *p, unsigned char sep, int strip_bom, size_t max_record);
void slm_csv_free(slm_csv *p);   /* frees memory and re-inits (keeps the options) */
int slm_csv_feed(slm_csv *p, const char *buf, size_t len, slm_csv_on_record on_record, void *ud);
/* End of input: reports the last record (or the unterminated quote); the
 * next feed starts a new stream at line 1. */
int slm_csv_finish(slm_csv *p, slm_csv_on_record on_record, void *ud);

/* Quoting of one field: 1 when it must be quoted (it holds the separator,
 * a quote, CR or LF, or starts or ends with a space or a tab; or it is
 * empty and alone in its record: pass alone = 1), else 0. */
int slm_csv_needs_quotes(const char *s, size_t n, unsigned char sep, int alone);
/* Bytes the field takes once written (with its quotes and doubled quotes). */
size_t slm_csv_field_size(const char *s, size_t n, int quoted);
/* Writes the field to out (slm_csv_field_size bytes); returns the end. */
char *slm_csv_put_field(char *out, const char *s, size_t n, int quoted);

#endif /* SLM_CSV_H */
