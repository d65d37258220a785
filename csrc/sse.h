/*
 * sse.h - the C API of the incremental Server-Sent Events parser (sse.c).
 *
 * The parser follows the WHATWG HTML "parsing an event stream" rules.  It
 * does no I/O and has no global state; the Lua binding (core.sse_parser) and
 * the fuzz harness (tests/fuzz/fuzz_sse.c) both sit on this API.
 *
 *   slm_sse p;
 *   slm_sse_init(&p, 16 << 20);                  // never allocates
 *   rc = slm_sse_feed(&p, buf, len, on_event, ud); // any chunk boundaries
 *   n = slm_sse_finish(&p);                       // end of input
 *   slm_sse_free(&p);                             // idempotent
 *
 * on_event is called once per dispatched event, in order.  The pointers in
 * the event are valid only during the call.  A failed parser (event larger
 * than max_event, or out of memory) stays failed until slm_sse_reset.
 *
 * slm_sse_chat_text() is the fast path for OpenAI chat.completion.chunk
 * events (used by the binding's p:feed_chat); the fuzz harness
 * tests/fuzz/fuzz_sse_chat.c checks it against its own JSON reader.
 */
#ifndef SLM_SSE_H
#define SLM_SSE_H

#include <stddef.h>

#define SLM_SSE_OK 0
#define SLM_SSE_ETOOBIG 1  /* an event exceeded max_event bytes */
#define SLM_SSE_ENOMEM 2   /* allocation failed */

#define SLM_SSE_DEFAULT_MAX_EVENT ((size_t)16 * 1024 * 1024)

typedef struct slm_sse_buf {
  char *p;
  size_t len, cap;
} slm_sse_buf;

typedef struct slm_sse_event {
  const char *data;   /* data buffer, lines joined with LF (binary-safe) */
  size_t data_len;
  const char *type;   /* event type: the event field, or "message" */
  size_t type_len;
  const char *id;     /* last event ID string, NULL when empty */
  size_t id_len;
} slm_sse_event;

typedef void (*slm_sse_on_event)(void *ud, const slm_sse_event *ev);

/* State of the chat.completion.chunk fast path (below); zero it to init. */
typedef struct slm_sse_chat {
  slm_sse_buf text;   /* the last content, escapes decoded */
  slm_sse_buf prefix; /* the last chunk accepted, up to its content's quote */
  unsigned known;     /* the known bits it was accepted with */
  unsigned state;     /* the reader's state just after its content */
} slm_sse_chat;

/* Parser state.  Treat as opaque; it is public only so that callers can
 * embed it (the Lua binding keeps it inside its userdata). */
typedef struct slm_sse {
  size_t max_event;
  slm_sse_buf data;     /* data lines of the pending event, LF-joined */
  slm_sse_buf type;     /* event type buffer */
  slm_sse_buf idval;    /* value of the id line being read */
  slm_sse_buf idbuf;    /* the spec's "last event ID buffer" */
  slm_sse_buf lastid;   /* the spec's "last event ID string" */
  slm_sse_chat chat;    /* the fast path's state (the binding's feed_chat) */
  size_t data_lines;    /* data fields seen in the pending event */
  size_t pending;       /* bytes received since the last blank line */
  unsigned long long racc; /* retry value being read */
  long long retry;
  int has_retry;
  int rbad;             /* retry value so far: 0 empty, 1 digits, 2 invalid */
  int state;            /* where the current line stands (sse.c) */
  int field;            /* field of the current line (sse.c) */
  int name_len;
  char name[8];         /* start of the field name being read */
  int bom;              /* BOM bytes matched at stream start; -1 when past it */
  int error_field;      /* option: "error" lines are data of an "error" event */
  int error_event;      /* the pending event had an "error" line */
  int cr;               /* the previous chunk ended with CR */
  int id_dirty;         /* idbuf changed since it was last committed */
  int err;              /* SLM_SSE_OK or the sticky error */
} slm_sse;

void slm_sse_init(slm_sse *p, size_t max_event);
/* An extension for llama.cpp's llama-server, which reports a failure inside
 * a stream as "error: {...}" lines (a field the standard ignores): with it
 * on, an "error" field is read as a data line and its event is dispatched
 * with type "error".  Off after init; kept by reset and free. */
void slm_sse_error_field(slm_sse *p, int on);
void slm_sse_free(slm_sse *p);    /* frees memory and re-inits (keeps max_event) */
void slm_sse_reset(slm_sse *p);   /* forget everything, keep buffers and max_event */
int slm_sse_feed(slm_sse *p, const char *buf, size_t len,
                 slm_sse_on_event on_event, void *ud);
/* End of input: drops an unterminated trailing event and returns how many
 * bytes had been received since the last blank line (0 on a clean end).
 * The last event ID and retry survive; the next feed starts a new stream. */
size_t slm_sse_finish(slm_sse *p);
/* Last event ID string (NULL when empty). */
const char *slm_sse_last_id(const slm_sse *p, size_t *len);
/* Last valid retry value in ms; returns 0 when none was seen. */
int slm_sse_retry(const slm_sse *p, long long *ms);

/* ---- the chat.completion.chunk fast path ------------------------------
 *
 * slm_sse_chat_text(ch, data, len, known, &text, &text_len) returns 1 when
 * data (one event's data) is a plain content-only chunk of choice 0, i.e.
 * when folding the chunk into slm.accumulate would do nothing but append a
 * content string to choice 0; it then points text at that content, JSON
 * escapes decoded (into data itself when it had none, else into ch->text).
 * It returns 0 for anything else, and whenever in doubt: the caller then
 * decodes the JSON in full.
 *
 * Accepted, exactly (JSON whitespace allowed wherever JSON allows it):
 *   - one JSON object and nothing after it;
 *   - "choices": exactly once, an array of exactly one object with
 *       "index": exactly once, the literal 0,
 *       "delta": exactly once, an object with
 *           "content": exactly once, a string,
 *           "role", "refusal", "reasoning", "reasoning_content",
 *           "tool_calls": null (any number of times) or absent,
 *           any other member: any valid JSON value (skipped),
 *       "finish_reason", "logprobs": null or absent,
 *       any other member: any valid JSON value (skipped);
 *   - "usage", "error": null or absent;
 *   - "id", "created", "model", "system_fingerprint": null or absent,
 *     unless the field's bit is set in `known` (SLM_CHAT_*): then any valid
 *     JSON value.  The accumulator reads these fields only until it has
 *     them (and never keeps a null), so the caller sets a bit once its
 *     accumulator would ignore the field;
 *   - any other top-level member: any valid JSON value (skipped).
 * Strict RFC 8259 syntax throughout (every string, number and literal of
 * skipped values too), with these refusals on top: member names with a
 * backslash in the three objects above, raw control characters (< 0x20)
 * anywhere in a string, lone or reversed UTF-16 surrogates in \u escapes,
 * and values nested deeper than SLM_CHAT_MAX_DEPTH.  Every input accepted
 * is thus also accepted by lua-cjson, which decodes it to the same content.
 * Bytes >= 0x80 pass through unchanged, as lua-cjson passes them.
 *
 * A stream's chunks mostly differ only from their content on: ch keeps the
 * bytes of the last accepted chunk up to its content string (when shorter
 * than SLM_CHAT_MAX_PREFIX), and a chunk that starts with the same bytes is
 * read from its content string on, with the same result as a full read.
 *
 * No recursion; allocates only to grow ch's buffers (failure: returns 0).
 * text stays valid until the next call with ch.
 */
#define SLM_CHAT_ID 1u
#define SLM_CHAT_CREATED 2u
#define SLM_CHAT_MODEL 4u
#define SLM_CHAT_FINGERPRINT 8u
#define SLM_CHAT_MAX_DEPTH 32     /* nesting levels inside one skipped value */
#define SLM_CHAT_MAX_PREFIX 4096

int slm_sse_chat_text(slm_sse_chat *ch, const char *data, size_t len, unsigned known,
                      const char **text, size_t *text_len);
void slm_sse_chat_free(slm_sse_chat *ch); /* frees and re-inits */

#endif /* SLM_SSE_H */
