/*
 * http.c - the libcurl multi driver: many HTTP requests in flight on one
 * multi handle, driven by one non-reentrant step() call.
 *
 * Design rules (see STYLE.md):
 *  - No Lua code ever runs inside a libcurl callback.  The write and header
 *    callbacks only append bytes to C buffers owned by the request; Lua reads
 *    them after step() has returned.  So nothing can raise through libcurl
 *    frames and nothing can re-enter the multi from a callback.
 *  - step() refuses re-entry ("loop already running").
 *  - A request in flight anchors its multi (registry ref) and its request
 *    body (registry ref to the Lua string, kept alive across the transfer).
 *    The request userdata itself is NOT anchored: if user code drops it while
 *    it is in flight, __gc detaches it from the multi first (cancelling the
 *    transfer cleanly) and only then frees the easy handle.
 *  - close, __close and __gc are one idempotent function.
 *
 * Lua API (module slm.core):
 *   core.multi{ max_connections = n, max_host_connections = n } -> Multi
 *   Multi:add{ url=, method=, headers={"K: v", ...}, body=,
 *              connect_timeout=, timeout=, idle_timeout=,
 *              first_byte_timeout=, http_version="1.1"|"2",
 *              ca_file=, max_body=, fresh_connect=bool } -> Request
 *     fresh_connect = true: this request opens a new connection instead of
 *     reusing a pooled one (CURLOPT_FRESH_CONNECT); the connection is
 *     pooled afterwards as usual.  For a retry after kind "reused".
 *   Multi:step(timeout_s) -> { Request, ... } (requests with new activity)
 *   Multi:count() -> number of requests in flight, plus the descriptors
 *                    armed with watch()
 *   Multi:watch(fd, "r" | "w" | nil)         (a descriptor of the caller's,
 *     a socket of slm.core's tcp_connect say, waited on by step() with
 *     libcurl's sockets: one-shot, so once it is ready it is disarmed and
 *     the integer fd is among what the next step() returns; "r"/"w" arms it
 *     again, nil forgets it (before the caller closes it).  The Lua layer's
 *     sockets that do not block the event loop are built on this.)
 *   Multi:fd() -> integer | nil              (descriptor for an outer event
 *                                             loop; nil on the poll() backend)
 *   Multi:timeout() -> seconds | nil         (when step() is due without
 *                                             socket activity; 0: now; nil:
 *                                             only on socket activity)
 *   Multi:close()
 *   Request:read() -> string | nil          (body bytes since last read)
 *   Request:status() -> integer             (0 until the status line)
 *   Request:headers() -> table, complete | nil (lowercase name -> value;
 *                                            complete: false when the reply
 *                                            ended inside its header block)
 *   Request:done() -> boolean
 *   Request:result() -> true | nil, kind, message, curl_code
 *     (nil, "running" while in flight).  kind is one of:
 *       "connect"   no connection (refused, DNS, TLS handshake, bad URL)
 *       "timeout"   connect/total timeout (libcurl's), first_byte_timeout
 *                   or idle_timeout (step()'s)
 *       "broken"    the connection failed during the exchange (nothing or
 *                   part of a reply; HTTP/2 stream errors)
 *       "reused"    the request went out on a reused keep-alive connection
 *                   that closed before replying, and libcurl was about to
 *                   send it again on another one by itself: stopped, so the
 *                   server may have seen it once and never twice; message
 *                   "the reused connection closed before replying;
 *                   libcurl's re-send was stopped", curl_code 42.  Resend
 *                   with fresh_connect = true if the request may be
 *                   repeated.  Only with core.resend_guard (libcurl 7.80+):
 *                   older libcurl re-sends silently, up to 5 times.
 *       "protocol"  reply larger than max_body
 *       "memory"    out of memory buffering the reply
 *       "cancelled" cancel(), close(), the multi closed, or collected
 *       "transport" any other libcurl failure (message says which)
 *   Request:cancel()                         (idempotent)
 *   Request:info() -> table of timings etc.
 *   Request:id() -> integer
 *   Request:last_activity() -> monotonic time of the last byte received
 *   core.events -> "epoll" | "poll"          (how step() waits for sockets)
 *   core.http_initialized() -> boolean       (whether this process has run
 *                                             curl_global_init; see curl_init)
 * Fields that describe libcurl; reading one sets libcurl up (curl_init):
 *   core.curl_version -> "7.88.1"            (the libcurl loaded at run time)
 *   core.http2 -> boolean                    (libcurl built with HTTP/2)
 *   core.h2c_reuse -> boolean                (http_version "2" on http://
 *                                             reuses connections: libcurl 8+)
 *   core.resend_guard -> boolean             (libcurl never re-sends a
 *                                             request by itself: kind
 *                                             "reused"; libcurl 7.80+)
 * core.multi() and those fields raise "slm.core: cannot initialise libcurl:
 * ..." when curl_global_init fails; nothing is recorded then, and the next
 * call tries again.
 *
 * Driving a multi from another event loop (luv, cqueues, ...), the shape of
 * luv's loop:backend_fd()/backend_timeout():
 *   1. wait until m:fd() is readable or m:timeout() seconds have passed
 *      (nil: no timer needed; round up to the loop's clock, e.g.
 *      math.ceil(t * 1000) ms: waking early only costs a step() that finds
 *      nothing due);
 *   2. call m:step(0) (never a positive timeout: that would block the outer
 *      loop) and handle the requests it returns; every request finished
 *      during the step is among them;
 *   3. read m:timeout() again and re-arm the timer; do so too after every
 *      add() and cancel() (a request just added makes it 0: libcurl starts
 *      it from its timer), then back to 1.
 * The descriptor is the epoll set, level-triggered: it stays readable while
 * a watched socket has events libcurl has not consumed, so watch it
 * level-triggered too (poll(), luv's uv_poll, an epoll set without
 * EPOLLET); it may also wake for an idle pooled connection the server
 * closed, which the next step() drops.  With the poll() backend (-DSLM_EVENTS
 * =poll, non-Linux) there is no such descriptor: fd() is nil, and the
 * multi is driven by step(timeout) itself.
 */
/* libcurl versions: the oldest this builds against is 7.81.0 (Ubuntu
 * 22.04's; tests/build/curl781.sh checks it on machines that have a newer
 * one).  What is newer than that is guarded by LIBCURL_VERSION_NUM:
 * CURLOPT_PROTOCOLS_STR (7.85; CURLOPT_PROTOCOLS before).  Everything else
 * is older, by libcurl's symbols-in-versions: CURL_HTTP_VERSION_3 (7.66),
 * CURLE_WEIRD_SERVER_REPLY (7.51), CURLINFO_HTTP_VERSION (7.50),
 * CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE and CURLE_HTTP2_STREAM (7.49),
 * CURL_HTTP_VERSION_2TLS (7.47), CURLOPT_PIPEWAIT and CURLPIPE_MULTIPLEX
 * (7.43), CURLE_HTTP2 (7.38), CURL_VERSION_HTTP2 (7.33),
 * CURLMOPT_MAX_HOST_CONNECTIONS (7.30), CURLOPT_TCP_KEEPALIVE (7.25),
 * CURLOPT_CLOSESOCKETFUNCTION (7.21.7), the rest 7.21.5 or older. */
#define _POSIX_C_SOURCE 200809L
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <ctype.h>
#include <math.h>
#include <pthread.h>
#include "slm.h"

/* How step() waits for the sockets libcurl wants watched: an epoll set on
 * Linux (unless the build asks for poll: cmake -DSLM_EVENTS=poll), poll()
 * elsewhere.  See run_sockets for why. */
#if defined(__linux__) && !defined(SLM_EVENTS_POLL)
#  define SLM_EPOLL 1
#  include <sys/epoll.h>
#  include <unistd.h>
#else
#  define SLM_EPOLL 0
#  include <poll.h>
#endif

#define MULTI_MT "slm.Multi"
#define REQ_MT "slm.Request"

/* ---- libcurl's global state: set up on first use ----
 *
 * Loading slm.core calls nothing of libcurl.  A process that only uses the
 * tokenizer or the SSE parser (an nginx worker counting tokens, a CLI
 * `count`) never runs curl_global_init, which initialises OpenSSL and the
 * other libraries libcurl is built with.  The first call that needs libcurl
 * does it: core.multi(), or reading one of the module's fields that describe
 * libcurl (curl_version, http2, h2c_reuse, resend_guard: see curl_field).
 * curl_version_info is called only then, right after curl_global_init,
 * because (a) it too reaches into libcurl and its TLS library, (b) it fills
 * static buffers of libcurl's, which threads must not do at once, and (c)
 * libcurl's maintainers say its answer (feature bits of a MultiSSL build) is
 * stable only after curl_global_init.
 *
 * Threads: several Lua states, each in its own thread, may load slm.core in
 * one process.  Our own mutex serialises them around curl_global_init and
 * the facts below, whatever libcurl says of itself: it costs one lock per
 * core.multi().  What it cannot do is keep another library of the process
 * from calling curl_global_init at the same moment; libcurl makes that safe
 * itself only from 7.84 on, in builds with CURL_VERSION_THREADSAFE.  Before
 * that, libcurl's rule (no other thread running) is the application's.
 * A failure is raised by the call that needed libcurl and nothing is
 * recorded, so a later call tries again.  curl_global_cleanup is never
 * called: other Lua states of the process may still use libcurl. */
static pthread_mutex_t curl_lock = PTHREAD_MUTEX_INITIALIZER;
static int curl_ready = 0;     /* curl_global_init succeeded (under curl_lock) */
static struct {
  char version[32];            /* "7.88.1" */
  unsigned version_num;        /* 0x075801 */
  int http2;                   /* built with HTTP/2 */
} curl_facts;
/* Whether this libcurl can reuse a cleartext HTTP/2 connection made with
 * prior knowledge (8.0 and newer; see multi_add).  Set by curl_init: every
 * reader holds a multi, which needed curl_init first. */
static int h2c_reuse = 0;

static CURLcode curl_init(void) {
  CURLcode rc = CURLE_OK;
  pthread_mutex_lock(&curl_lock);
  if (!curl_ready) {
    rc = curl_global_init(CURL_GLOBAL_DEFAULT);
    if (rc == CURLE_OK) {
      curl_version_info_data *vi = curl_version_info(CURLVERSION_NOW);
      strncpy(curl_facts.version, vi->version, sizeof curl_facts.version - 1);
      curl_facts.version_num = vi->version_num;
      curl_facts.http2 = (vi->features & CURL_VERSION_HTTP2) != 0;
      h2c_reuse = vi->version_num >= 0x080000;
      curl_ready = 1;
    }
  }
  pthread_mutex_unlock(&curl_lock);
  return rc;
}

/* Initialise libcurl for the call that needs it, or raise saying why. */
static void need_curl(lua_State *L) {
  CURLcode rc = curl_init();
  if (rc != CURLE_OK)
    luaL_error(L, "slm.core: cannot initialise libcurl: curl_global_init: %s (%d)",
               curl_easy_strerror(rc), (int)rc);
}

typedef struct slm_multi slm_multi;
typedef struct slm_req slm_req;

/* The multi is driven through curl_multi_socket_action: libcurl tells us
 * (on_socket, on_timer) which sockets to watch and when it wants its
 * timeout handling; step() polls those sockets itself and hands libcurl
 * only the ones that fired.  curl_multi_perform would instead visit every
 * transfer, with a poll() system call each, on every step: 40 us with 50
 * requests in flight, paid again by every step(0) the scheduler makes.
 * The sockets are mirrored into an epoll set where there is one, so that a
 * step costs what is ready, not what is watched (run_sockets). */
struct slm_multi {
  CURLM *multi;
  int in_step;
  int weak_ref;        /* registry ref: weak-valued table id -> Request */
  slm_req *head;       /* requests in flight (doubly linked) */
  lua_Integer next_id;
  int count;
  int ntimed;          /* of those, how many have an idle or first-byte timeout */
#if SLM_EPOLL
  int epfd;            /* epoll set of the sockets libcurl asked us to watch; -1: none */
  int nwatch;          /* sockets in the set (FD_IN/FD_OUT set in fdst) */
  unsigned char *fdst; /* per socket number: FD_* bits (see on_socket) */
  int capfd;
#else
  struct pollfd *pfd;  /* the sockets libcurl asked us to watch */
  int npfd, cappfd;
#endif
  int sock_failed;     /* on_socket could not watch a socket ... */
  int sock_errno;      /* ... and why (errno) */
  double timer_at;     /* when libcurl wants its timeout handling; -1: never */
  lua_Integer *rdy;    /* ids of requests with activity since the last step */
  int nrdy, caprdy;
  int rdy_lost;        /* an id could not be recorded: report by a full scan */
  CURL **pool;         /* easy handles of finished requests, reset for reuse */
  int npool;
  int nxwatch;         /* descriptors of the caller's armed with watch() */
  int *xrdy;           /* of those, the ones that fired since the last step */
  int nxrdy, capxrdy;
#if !SLM_EPOLL
  int *xfd;            /* the caller's descriptors in pfd (the rest are libcurl's) */
  int nxfd, capxfd;
#endif
};

#define POOL_MAX 64    /* easy handles kept for reuse per multi */

enum { R_IDLE = 0, R_RUNNING = 1, R_DONE = 2 };
enum { A_NONE = 0, A_CANCELLED, A_IDLE, A_FIRST_BYTE, A_TOO_BIG, A_NOMEM, A_REUSED };

/* libcurl 7.80 has CURLOPT_PREREQFUNCTION, with which on_prereq stops
 * libcurl's own re-send of a request (see there); older ones cannot. */
#define SLM_PREREQ (LIBCURL_VERSION_NUM >= 0x075000)

typedef struct {
  char *p;
  size_t len, cap;
} sbuf;

struct slm_req {
  CURL *easy;
  slm_multi *m;        /* set while attached to the multi */
  slm_req *prev, *next;
  lua_Integer id;
  int state;
  int body_ref;        /* anchors the request body string */
  int multi_ref;       /* anchors the multi while in flight */
  struct curl_slist *hdrs;
  sbuf body;           /* response body bytes not yet read */
  sbuf head;           /* raw response header block (last response) */
  long status;
  int headers_done;
  int ready;           /* activity since the last step (and listed in m->rdy) */
  int abort_reason;
  CURLcode result;
  double t_start, t_last, t_first;
  double idle_timeout, first_byte_timeout;
  size_t max_body, received;
  int sends;           /* times libcurl was about to send it (on_prereq) */
  /* libcurl's figures, kept when the request finishes: its easy handle
   * goes back to the multi's pool then */
  struct {
    int have;
    double total_time, connect_time;
    long new_connections, http_version;
    char ip[48];
  } info;
  char errbuf[CURL_ERROR_SIZE];
};

static int sbuf_add(sbuf *b, const char *s, size_t n) {
  if (b->len + n + 1 > b->cap) {
    /* first block under 1 KB: glibc serves those from its small bins,
     * larger first requests made it consolidate its fast bins each time */
    size_t cap = b->cap ? b->cap : 992;
    char *p;
    while (cap < b->len + n + 1) cap *= 2;
    p = (char *)realloc(b->p, cap);
    if (!p) return 0;
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
  return 1;
}

static void sbuf_free(sbuf *b) {
  free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
}

/* Note activity on r for the next step() to report. */
static void mark_ready(slm_req *r) {
  slm_multi *m = r->m;
  if (r->ready) return;
  r->ready = 1;
  if (!m) return;
  if (m->nrdy == m->caprdy) {
    int cap = m->caprdy ? m->caprdy * 2 : 64;
    lua_Integer *p = (lua_Integer *)realloc(m->rdy, (size_t)cap * sizeof *p);
    if (!p) { m->rdy_lost = 1; return; }
    m->rdy = p;
    m->caprdy = cap;
  }
  m->rdy[m->nrdy++] = r->id;
}

/* A descriptor armed with watch() fired: disarmed, noted for step(). */
static void xfd_fired(slm_multi *m, int fd) {
  m->nxwatch--;
  if (m->nxrdy == m->capxrdy) {
    int cap = m->capxrdy ? m->capxrdy * 2 : 16;
    int *p = (int *)realloc(m->xrdy, (size_t)cap * sizeof *p);
    if (!p) return; /* lost: its waiter's own deadline wakes it */
    m->xrdy = p;
    m->capxrdy = cap;
  }
  m->xrdy[m->nxrdy++] = fd;
}

/* ---- libcurl callbacks: pure C, no Lua ---- */

static size_t on_write(char *ptr, size_t size, size_t nmemb, void *ud) {
  slm_req *r = (slm_req *)ud;
  size_t n = size * nmemb;
  r->t_last = slm_now();
  if (r->t_first == 0) r->t_first = r->t_last;
  mark_ready(r);
  r->received += n;
  if (r->max_body && r->received > r->max_body) {
    r->abort_reason = A_TOO_BIG;
    return 0; /* CURLE_WRITE_ERROR */
  }
  if (!sbuf_add(&r->body, ptr, n)) {
    r->abort_reason = A_NOMEM;
    return 0;
  }
  return n;
}

static size_t on_header(char *ptr, size_t size, size_t nmemb, void *ud) {
  slm_req *r = (slm_req *)ud;
  size_t n = size * nmemb;
  r->t_last = slm_now();
  if (n >= 5 && memcmp(ptr, "HTTP/", 5) == 0) {
    /* a new response (after 100-continue or on a retried connection) */
    r->head.len = 0;
    r->headers_done = 0;
    {
      const char *sp = memchr(ptr, ' ', n);
      r->status = (sp && (size_t)(sp - ptr) + 4 <= n) ? strtol(sp + 1, NULL, 10) : 0;
    }
  }
  if (n == 2 && ptr[0] == '\r' && ptr[1] == '\n') {
    if (r->status >= 100 && r->status < 200) return n; /* interim */
    r->headers_done = 1;
    mark_ready(r);
    return n;
  }
  if (!sbuf_add(&r->head, ptr, n)) {
    r->abort_reason = A_NOMEM;
    return 0;
  }
  return n;
}

#if SLM_PREREQ
/* Called by libcurl right before it sends the request on a connection,
 * once per attempt.  A second attempt is libcurl re-sending the request on
 * its own: when a reused keep-alive connection dies before any byte of the
 * reply, Curl_retry_request (lib/transfer.c, 7.81 to 8.x) sends it again
 * on another connection, up to 5 times, and a POST the server had already
 * read would be processed again.  So the second attempt is refused: the
 * request finishes with kind "reused", and whether to send it again (with
 * fresh_connect) is the client's choice. */
static int on_prereq(void *clientp, char *remote_ip, char *local_ip, int remote_port, int local_port) {
  slm_req *r = (slm_req *)clientp;
  (void)remote_ip;
  (void)local_ip;
  (void)remote_port;
  (void)local_port;
  if (r->sends++ == 0) return CURL_PREREQFUNC_OK;
  r->abort_reason = A_REUSED;
  return CURL_PREREQFUNC_ABORT;
}
#endif

/* on_socket could not watch a socket: step() raises (libcurl's multi is
 * unusable once the callback returned -1). */
static int watch_failed(slm_multi *m, int err) {
  m->sock_failed = 1;
  m->sock_errno = err;
  return -1;
}

#if SLM_EPOLL
/* The epoll set, kept lazily.  libcurl stops watching a connection's socket
 * when a transfer ends (CURL_POLL_REMOVE) and watches it again, for the same
 * event, when the next request reuses the connection: mirrored literally that
 * is an EPOLL_CTL_ADD and a DEL per request, 4,400 system calls for 2,000
 * requests, and it made epoll cost 20 % more CPU than poll() at 200 in
 * flight.  So a socket stays in the set after CURL_POLL_REMOVE, marked as
 * not wanted (FD_WANT clear):
 *  - watched again for the same events: no system call at all;
 *  - an event on it while not wanted (the server closed an idle
 *    connection): run_sockets deletes it then and tells libcurl nothing;
 *  - closed by libcurl: on_close_socket forgets it (the kernel removes a
 *    closed socket from the set by itself), so a new socket that gets the
 *    same number starts from "not in the set".
 * fdst[] covers every socket libcurl created through this multi: on_open_
 * socket (CURLOPT_SOCKOPTFUNCTION, run for each new socket) makes room, where
 * failing only fails that transfer. */
#define FD_IN 1u
#define FD_OUT 2u
#define FD_WANT 4u
#define FD_EXT 8u      /* in the set for watch(), not libcurl's */
#define FD_ARMED 16u   /* ... and armed (EPOLLONESHOT not fired yet) */

static int fd_room(slm_multi *m, curl_socket_t s) {
  if (s < 0 || s >= INT_MAX) return 0; /* capfd is an int: room for s + 1 */
  if (s >= m->capfd) {
    /* size_t: doubling an int past 2^30 would overflow */
    size_t cap = m->capfd ? (size_t)m->capfd : 64;
    unsigned char *p;
    while (cap <= (size_t)s) cap *= 2;
    if (cap > (size_t)INT_MAX) cap = (size_t)INT_MAX;
    p = (unsigned char *)realloc(m->fdst, cap);
    if (!p) return 0;
    memset(p + m->capfd, 0, cap - (size_t)m->capfd);
    m->fdst = p;
    m->capfd = (int)cap;
  }
  return 1;
}

static int on_open_socket(void *clientp, curl_socket_t s, curlsocktype purpose) {
  slm_req *r = (slm_req *)clientp; /* attached to its multi while it runs */
  slm_multi *m = r->m;
  (void)purpose;
  if (!m) return CURL_SOCKOPT_OK; /* not attached (cannot happen): on_socket copes */
  if (!fd_room(m, s)) {
    r->abort_reason = A_NOMEM; /* this transfer fails, kind "memory" */
    return CURL_SOCKOPT_ERROR;
  }
  m->fdst[s] = 0; /* a new socket is in no set, whatever its number was */
  return CURL_SOCKOPT_OK;
}

static int on_close_socket(void *clientp, curl_socket_t s) {
  slm_multi *m = (slm_multi *)clientp;
  if (s >= 0 && s < m->capfd) {
    if (m->fdst[s] & (FD_IN | FD_OUT)) m->nwatch--; /* close() takes it out */
    m->fdst[s] = 0;
  }
  return close(s);
}

/* Which events libcurl wants on socket s (CURL_POLL_*). */
static int on_socket(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp) {
  slm_multi *m = (slm_multi *)userp;
  struct epoll_event ev;
  unsigned want, st;
  int op, rc;
  (void)easy;
  (void)socketp;
  if (!fd_room(m, s)) return watch_failed(m, ENOMEM); /* a socket on_open_socket did not see */
  st = m->fdst[s];
  if (what == CURL_POLL_REMOVE) {
    m->fdst[s] = (unsigned char)(st & ~FD_WANT); /* stays in the set: see above */
    return 0;
  }
  want = ((what & CURL_POLL_IN) ? FD_IN : 0) | ((what & CURL_POLL_OUT) ? FD_OUT : 0);
  if ((st & (FD_IN | FD_OUT)) == want) { /* already in the set for exactly that */
    m->fdst[s] = (unsigned char)(want | FD_WANT);
    return 0;
  }
  memset(&ev, 0, sizeof ev);
  /* level-triggered, as poll(): what libcurl leaves unread is reported
   * again.  No EPOLLRDHUP: a peer's shutdown makes the socket readable,
   * and EPOLLHUP and EPOLLERR are always reported. */
  ev.events = ((want & FD_IN) ? EPOLLIN : 0) | ((want & FD_OUT) ? EPOLLOUT : 0);
  ev.data.fd = s;
  op = (st & (FD_IN | FD_OUT)) ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
  rc = epoll_ctl(m->epfd, op, s, &ev);
  /* the fallbacks keep the set right should fdst ever be wrong about s */
  if (rc < 0 && op == EPOLL_CTL_ADD && errno == EEXIST)
    rc = epoll_ctl(m->epfd, EPOLL_CTL_MOD, s, &ev);
  else if (rc < 0 && op == EPOLL_CTL_MOD && errno == ENOENT)
    rc = epoll_ctl(m->epfd, EPOLL_CTL_ADD, s, &ev);
  if (rc < 0) return watch_failed(m, errno); /* ENOMEM, ENOSPC (max_user_watches) */
  if (!(st & (FD_IN | FD_OUT))) m->nwatch++;
  m->fdst[s] = (unsigned char)(want | FD_WANT);
  return 0;
}
#else
/* Which events libcurl wants on socket s (CURL_POLL_*): kept in m->pfd. */
static int on_socket(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp) {
  slm_multi *m = (slm_multi *)userp;
  int i;
  (void)easy;
  (void)socketp;
  for (i = 0; i < m->npfd; i++)
    if (m->pfd[i].fd == s) break;
  if (what == CURL_POLL_REMOVE) {
    if (i < m->npfd) m->pfd[i] = m->pfd[--m->npfd];
    return 0;
  }
  if (i == m->npfd) {
    if (m->npfd == m->cappfd) {
      int cap = m->cappfd ? m->cappfd * 2 : 16;
      struct pollfd *p = (struct pollfd *)realloc(m->pfd, (size_t)cap * sizeof *p);
      if (!p) return watch_failed(m, ENOMEM);
      m->pfd = p;
      m->cappfd = cap;
    }
    m->pfd[i].fd = s;
    m->pfd[i].revents = 0;
    m->npfd++;
  }
  m->pfd[i].events = (short)(((what & CURL_POLL_IN) ? POLLIN : 0) | ((what & CURL_POLL_OUT) ? POLLOUT : 0));
  return 0;
}
#endif

/* When libcurl wants curl_multi_socket_action(CURL_SOCKET_TIMEOUT). */
static int on_timer(CURLM *multi, long ms, void *userp) {
  slm_multi *m = (slm_multi *)userp;
  (void)multi;
  m->timer_at = ms < 0 ? -1 : slm_now() + (double)ms / 1000.0;
  return 0;
}

/* ---- helpers ---- */

static slm_multi *check_multi(lua_State *L, int i) {
  slm_multi *m = (slm_multi *)luaL_checkudata(L, i, MULTI_MT);
  if (!m->multi) luaL_argerror(L, i, "multi is closed");
  return m;
}

static slm_req *check_req(lua_State *L, int i) {
  return (slm_req *)luaL_checkudata(L, i, REQ_MT);
}

static void list_remove(slm_multi *m, slm_req *r) {
  if (r->prev) r->prev->next = r->next;
  else m->head = r->next;
  if (r->next) r->next->prev = r->prev;
  r->prev = r->next = NULL;
  m->count--;
}

/* Detach a request from its multi: the transfer stops (if running) and the
 * connection goes back to the multi's pool or is closed by libcurl. */
static void req_detach(lua_State *L, slm_req *r) {
  slm_multi *m = r->m;
  if (!m) return;
  if (m->multi && r->easy) curl_multi_remove_handle(m->multi, r->easy);
  list_remove(m, r);
  if (r->idle_timeout > 0 || r->first_byte_timeout > 0) m->ntimed--;
  r->m = NULL;
  if (L && r->multi_ref != LUA_NOREF) {
    luaL_unref(L, LUA_REGISTRYINDEX, r->multi_ref);
    r->multi_ref = LUA_NOREF;
  }
  if (L && r->body_ref != LUA_NOREF) {
    luaL_unref(L, LUA_REGISTRYINDEX, r->body_ref);
    r->body_ref = LUA_NOREF;
  }
}

/* Keep libcurl's figures for info(), then give the easy handle back to
 * the multi's pool (or free it): a finished request needs it no more. */
static void req_release_easy(slm_multi *m, slm_req *r) {
  double d;
  long l;
  char *ip = NULL;
  CURL *e = r->easy;
  if (!e) return;
  r->info.have = 1;
  if (curl_easy_getinfo(e, CURLINFO_TOTAL_TIME, &d) == CURLE_OK) r->info.total_time = d;
  if (curl_easy_getinfo(e, CURLINFO_CONNECT_TIME, &d) == CURLE_OK) r->info.connect_time = d;
  if (curl_easy_getinfo(e, CURLINFO_NUM_CONNECTS, &l) == CURLE_OK) r->info.new_connections = l;
  if (curl_easy_getinfo(e, CURLINFO_HTTP_VERSION, &l) == CURLE_OK) r->info.http_version = l;
  if (curl_easy_getinfo(e, CURLINFO_PRIMARY_IP, &ip) == CURLE_OK && ip) {
    strncpy(r->info.ip, ip, sizeof r->info.ip - 1);
    r->info.ip[sizeof r->info.ip - 1] = '\0';
  }
  r->easy = NULL;
  if (m && m->multi && m->npool < POOL_MAX) {
    if (!m->pool) m->pool = (CURL **)malloc(POOL_MAX * sizeof *m->pool);
    if (m->pool) {
      curl_easy_reset(e);
      m->pool[m->npool++] = e;
      return;
    }
  }
  curl_easy_cleanup(e);
}

static void req_finish(lua_State *L, slm_req *r, CURLcode rc) {
  slm_multi *m = r->m;
  r->result = rc;
  r->state = R_DONE;
  /* finished by step(): it reports the request.  Finished outside it
   * (cancel, close, the multi closed) the caller knows already, and a
   * note left for the next step() would keep it from waiting */
  if (m && m->in_step) mark_ready(r);
  req_detach(L, r);
  req_release_easy(m, r);
}

static double opt_number(lua_State *L, int t, const char *k, double def) {
  double v = def;
  if (slm_getfield(L, t, k) != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TNUMBER)
      luaL_error(L, "slm.core: option '%s' must be a number", k);
    v = lua_tonumber(L, -1);
    if (!(v >= 0) || isinf(v))
      luaL_error(L, "slm.core: option '%s' must be a non-negative number", k);
  }
  lua_pop(L, 1);
  return v;
}

static int opt_bool(lua_State *L, int t, const char *k) {
  int v = 0;
  if (slm_getfield(L, t, k) != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TBOOLEAN)
      luaL_error(L, "slm.core: option '%s' must be a boolean", k);
    v = lua_toboolean(L, -1);
  }
  lua_pop(L, 1);
  return v;
}

static long secs_to_ms(double s) {
  double ms = ceil(s * 1000.0);
  if (!(ms <= 2147483647.0)) ms = 2147483647.0; /* inf too */
  return (long)ms;
}

/* A non-negative finite number as a size_t (no undefined conversion of a
 * value beyond its range): larger ones saturate. */
static size_t num_to_size(double v) {
  if (v >= 18446744073709551616.0 || v >= (double)SIZE_MAX) return SIZE_MAX;
  return (size_t)v;
}

/* ---- Multi ---- */

static int l_multi(lua_State *L) {
  slm_multi *m;
  long maxconn = 0, maxhost = 0;
  if (!lua_isnoneornil(L, 1)) {
    luaL_checktype(L, 1, LUA_TTABLE);
    double c = opt_number(L, 1, "max_connections", 0);
    double h = opt_number(L, 1, "max_host_connections", 0);
    maxconn = c > 2147483647.0 ? 2147483647L : (long)c;
    maxhost = h > 2147483647.0 ? 2147483647L : (long)h;
  }
  need_curl(L);
  /* safe closed state first, then acquire */
  m = (slm_multi *)slm_newuserdata(L, sizeof *m);
  memset(m, 0, sizeof *m);
  m->weak_ref = LUA_NOREF;
  m->timer_at = -1;
#if SLM_EPOLL
  m->epfd = -1;
#endif
  luaL_setmetatable(L, MULTI_MT);
  lua_newtable(L);
  lua_newtable(L);
  lua_pushliteral(L, "v");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  m->weak_ref = luaL_ref(L, LUA_REGISTRYINDEX);
#if SLM_EPOLL
  /* before the multi: libcurl's callbacks may use it as soon as that exists */
  m->epfd = epoll_create1(EPOLL_CLOEXEC);
  if (m->epfd < 0) {
    int err = errno;
    m->epfd = -1;
    return luaL_error(L, "slm.core: epoll_create1 failed: %s", strerror(err));
  }
#endif
  m->multi = curl_multi_init();
  if (!m->multi) return luaL_error(L, "slm.core: curl_multi_init failed");
  curl_multi_setopt(m->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
  curl_multi_setopt(m->multi, CURLMOPT_SOCKETDATA, (void *)m);
  curl_multi_setopt(m->multi, CURLMOPT_TIMERFUNCTION, on_timer);
  curl_multi_setopt(m->multi, CURLMOPT_TIMERDATA, (void *)m);
  curl_multi_setopt(m->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
  if (maxconn > 0) curl_multi_setopt(m->multi, CURLMOPT_MAXCONNECTS, maxconn);
  if (maxhost > 0) curl_multi_setopt(m->multi, CURLMOPT_MAX_HOST_CONNECTIONS, maxhost);
  return 1;
}

static int multi_close(lua_State *L) {
  slm_multi *m = (slm_multi *)luaL_checkudata(L, 1, MULTI_MT);
  if (m->in_step) return luaL_error(L, "slm.core: cannot close the multi while its loop runs");
  while (m->head) {
    slm_req *r = m->head;
    r->abort_reason = A_CANCELLED;
    req_finish(L, r, CURLE_ABORTED_BY_CALLBACK);
  }
  if (m->multi) {
    curl_multi_cleanup(m->multi);
    m->multi = NULL;
  }
  while (m->npool > 0) curl_easy_cleanup(m->pool[--m->npool]);
  free(m->pool);
  m->pool = NULL;
  /* only now: curl_multi_cleanup closes connections, through on_socket */
#if SLM_EPOLL
  if (m->epfd >= 0) {
    close(m->epfd);
    m->epfd = -1;
  }
  m->nwatch = 0;
  free(m->fdst);
  m->fdst = NULL;
  m->capfd = 0;
#else
  free(m->pfd);
  m->pfd = NULL;
  m->npfd = m->cappfd = 0;
#endif
  free(m->rdy);
  m->rdy = NULL;
  m->nrdy = m->caprdy = 0;
  free(m->xrdy);
  m->xrdy = NULL;
  m->nxrdy = m->capxrdy = m->nxwatch = 0;
#if !SLM_EPOLL
  free(m->xfd);
  m->xfd = NULL;
  m->nxfd = m->capxfd = 0;
#endif
  if (m->weak_ref != LUA_NOREF) {
    luaL_unref(L, LUA_REGISTRYINDEX, m->weak_ref);
    m->weak_ref = LUA_NOREF;
  }
  return 0;
}

static void set_headers(lua_State *L, slm_req *r, int t) {
  lua_Integer i, n;
  if (slm_getfield(L, t, "headers") == LUA_TNIL) {
    lua_pop(L, 1);
  } else {
    if (!lua_istable(L, -1)) luaL_error(L, "slm.core: option 'headers' must be a list of strings");
    n = (lua_Integer)lua_rawlen(L, -1);
    for (i = 1; i <= n; i++) {
      struct curl_slist *nl;
      slm_rawgeti(L, -1, i);
      if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "slm.core: headers[%d] must be a string", (int)i);
      if (strchr(lua_tostring(L, -1), '\r') || strchr(lua_tostring(L, -1), '\n'))
        luaL_error(L, "slm.core: headers[%d] contains a line break", (int)i);
      if (strlen(lua_tostring(L, -1)) != lua_rawlen(L, -1))
        luaL_error(L, "slm.core: headers[%d] contains a NUL byte", (int)i);
      nl = curl_slist_append(r->hdrs, lua_tostring(L, -1));
      if (!nl) luaL_error(L, "slm.core: out of memory");
      r->hdrs = nl;
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  /* never "Expect: 100-continue": it costs a round trip per POST */
  {
    struct curl_slist *nl = curl_slist_append(r->hdrs, "Expect:");
    if (!nl) luaL_error(L, "slm.core: out of memory");
    r->hdrs = nl;
  }
}

/* Option k of the options table (slot 2): a string without NUL bytes,
 * left on the stack, or NULL (nothing pushed) when absent and optional. */
static const char *opt_string(lua_State *L, const char *k, int required) {
  size_t n;
  const char *s;
  if (slm_getfield(L, 2, k) == LUA_TNIL && !required) {
    lua_pop(L, 1);
    return NULL;
  }
  if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "slm.core: option '%s' must be a string", k);
  s = lua_tolstring(L, -1, &n);
  if (strlen(s) != n) luaL_error(L, "slm.core: option '%s' contains a NUL byte", k);
  return s;
}

static int multi_add(lua_State *L) {
  slm_multi *m = check_multi(L, 1);
  slm_req *r;
  const char *url, *method = NULL, *httpv = NULL, *ca_file = NULL;
  size_t bodylen = 0;
  const char *body = NULL;
  double connect_timeout, timeout;
  int fresh_connect;
  CURLMcode mc;
  luaL_checktype(L, 2, LUA_TTABLE);
  if (m->in_step) return luaL_error(L, "slm.core: cannot add requests while the loop runs");

  /* safe state first */
  r = (slm_req *)slm_newuserdata(L, sizeof *r);
  memset(r, 0, sizeof *r);
  r->body_ref = r->multi_ref = LUA_NOREF;
  luaL_setmetatable(L, REQ_MT);

  /* the option strings stay on the stack (slots 4 on) until libcurl has
   * copied them: an __index of the options table may return a string that
   * nothing else holds, which a collection would free */
  url = opt_string(L, "url", 1);
  method = opt_string(L, "method", 0);
  if (slm_getfield(L, 2, "http_version") != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TSTRING ||
        (strcmp(lua_tostring(L, -1), "1.1") != 0 && strcmp(lua_tostring(L, -1), "2") != 0))
      return luaL_error(L, "slm.core: option 'http_version' must be \"1.1\" or \"2\"");
    httpv = lua_tostring(L, -1);
  } else {
    lua_pop(L, 1);
  }
  ca_file = opt_string(L, "ca_file", 0);
  if (slm_getfield(L, 2, "body") != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TSTRING) return luaL_error(L, "slm.core: option 'body' must be a string");
    body = lua_tolstring(L, -1, &bodylen);
    r->body_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* keeps the bytes alive */
  } else {
    lua_pop(L, 1);
  }
  connect_timeout = opt_number(L, 2, "connect_timeout", 0);
  timeout = opt_number(L, 2, "timeout", 0);
  r->idle_timeout = opt_number(L, 2, "idle_timeout", 0);
  r->first_byte_timeout = opt_number(L, 2, "first_byte_timeout", 0);
  r->max_body = num_to_size(opt_number(L, 2, "max_body", 0));
  fresh_connect = opt_bool(L, 2, "fresh_connect");

#if !SLM_EPOLL
  /* room for this request's sockets now, where failing can raise: in
   * on_socket it would leave libcurl's multi unusable (the epoll set's
   * memory is the kernel's: nothing to reserve there) */
  if (m->cappfd < 2 * (m->count + 1) + 8) {
    int cap = 2 * (m->count + 1) + 8 + m->cappfd;
    struct pollfd *p = (struct pollfd *)realloc(m->pfd, (size_t)cap * sizeof *p);
    if (!p) return luaL_error(L, "slm.core: out of memory");
    m->pfd = p;
    m->cappfd = cap;
  }
#endif
  r->easy = m->npool > 0 ? m->pool[--m->npool] : curl_easy_init();
  if (!r->easy) return luaL_error(L, "slm.core: curl_easy_init failed");
  set_headers(L, r, 2);

  curl_easy_setopt(r->easy, CURLOPT_URL, url);
  curl_easy_setopt(r->easy, CURLOPT_PRIVATE, (void *)r);
  curl_easy_setopt(r->easy, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(r->easy, CURLOPT_ERRORBUFFER, r->errbuf);
  curl_easy_setopt(r->easy, CURLOPT_WRITEFUNCTION, on_write);
  curl_easy_setopt(r->easy, CURLOPT_WRITEDATA, (void *)r);
  curl_easy_setopt(r->easy, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(r->easy, CURLOPT_HEADERDATA, (void *)r);
  curl_easy_setopt(r->easy, CURLOPT_HTTPHEADER, r->hdrs);
  curl_easy_setopt(r->easy, CURLOPT_TCP_KEEPALIVE, 1L);
  curl_easy_setopt(r->easy, CURLOPT_TCP_NODELAY, 1L);
#if SLM_EPOLL
  /* every socket of this multi's connections passes here: see on_socket */
  curl_easy_setopt(r->easy, CURLOPT_SOCKOPTFUNCTION, on_open_socket);
  curl_easy_setopt(r->easy, CURLOPT_SOCKOPTDATA, (void *)r);
  curl_easy_setopt(r->easy, CURLOPT_CLOSESOCKETFUNCTION, on_close_socket);
  curl_easy_setopt(r->easy, CURLOPT_CLOSESOCKETDATA, (void *)m);
#endif
  /* Wait for a pending connection that may multiplex (HTTP/2) rather than
   * open another - only where HTTP/2 is possible: over TLS (ALPN) unless
   * HTTP/1.1 is asked for, or with prior knowledge.  On HTTP/1.1 it would
   * serialise new requests behind the first one.  Prior knowledge on
   * http:// ("h2c") with a libcurl older than 8.0: a reused connection
   * fails with "Error in the HTTP2 framing layer" (libcurl's own bug, fixed
   * in 8.0; Debian 12 ships 7.88, whose curl CLI fails the same way), so
   * there every request gets a connection of its own. */
  {
    int https = strncasecmp(url, "https://", 8) == 0;
    int h2 = httpv && strcmp(httpv, "2") == 0;
    if (h2 && !https && !h2c_reuse) {
      curl_easy_setopt(r->easy, CURLOPT_FRESH_CONNECT, 1L);
      curl_easy_setopt(r->easy, CURLOPT_FORBID_REUSE, 1L);
    } else if (https ? !(httpv && strcmp(httpv, "1.1") == 0) : h2) {
      curl_easy_setopt(r->easy, CURLOPT_PIPEWAIT, 1L);
    }
  }
  /* a new connection for this request (the client's retry after "reused") */
  if (fresh_connect) curl_easy_setopt(r->easy, CURLOPT_FRESH_CONNECT, 1L);
#if SLM_PREREQ
  /* libcurl never sends the request twice by itself (see on_prereq) */
  curl_easy_setopt(r->easy, CURLOPT_PREREQFUNCTION, on_prereq);
  curl_easy_setopt(r->easy, CURLOPT_PREREQDATA, (void *)r);
#endif
  /* a private CA (a self-hosted server); libcurl copies the string */
  if (ca_file) curl_easy_setopt(r->easy, CURLOPT_CAINFO, ca_file);
  curl_easy_setopt(r->easy, CURLOPT_FOLLOWLOCATION, 0L);
#if LIBCURL_VERSION_NUM >= 0x075500 /* 7.85 */
  curl_easy_setopt(r->easy, CURLOPT_PROTOCOLS_STR, "http,https");
#else /* the bit mask, deprecated from 7.85 on */
  curl_easy_setopt(r->easy, CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
  if (httpv && strcmp(httpv, "1.1") == 0)
    curl_easy_setopt(r->easy, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
  else if (httpv && strcmp(httpv, "2") == 0)
    curl_easy_setopt(r->easy, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE);
  else
    curl_easy_setopt(r->easy, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
  if (connect_timeout > 0) curl_easy_setopt(r->easy, CURLOPT_CONNECTTIMEOUT_MS, secs_to_ms(connect_timeout));
  if (timeout > 0) curl_easy_setopt(r->easy, CURLOPT_TIMEOUT_MS, secs_to_ms(timeout));
  if (body) {
    curl_easy_setopt(r->easy, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(r->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)bodylen);
  }
  if (method) {
    if (strcmp(method, "GET") == 0 && !body) curl_easy_setopt(r->easy, CURLOPT_HTTPGET, 1L);
    else if (!(strcmp(method, "POST") == 0 && body)) curl_easy_setopt(r->easy, CURLOPT_CUSTOMREQUEST, method);
  }

  r->id = ++m->next_id;
  lua_settop(L, 3); /* the request; libcurl has copied the option strings */
  /* The Lua allocations first: a collection step in one of them may run a
   * __gc finalizer that closes this multi, which must then find the
   * request not attached yet (and not leave it attached to a closed multi,
   * nor anchoring it for ever) */
  if (!m->multi) return luaL_error(L, "slm.core: the multi was closed while adding a request");
  lua_rawgeti(L, LUA_REGISTRYINDEX, m->weak_ref); /* id -> request, weak */
  lua_pushvalue(L, 3);
  slm_rawseti(L, -2, r->id);
  lua_pop(L, 1);
  lua_pushvalue(L, 1);
  r->multi_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  if (!m->multi) return luaL_error(L, "slm.core: the multi was closed while adding a request");
  r->t_start = r->t_last = slm_now();
  mc = curl_multi_add_handle(m->multi, r->easy);
  if (mc != CURLM_OK) return luaL_error(L, "slm.core: curl_multi_add_handle: %s", curl_multi_strerror(mc));
  r->m = m;
  r->state = R_RUNNING;
  r->next = m->head;
  if (m->head) m->head->prev = r;
  m->head = r;
  m->count++;
  if (r->idle_timeout > 0 || r->first_byte_timeout > 0) m->ntimed++;
  return 1;
}

/* Abort requests whose idle or first-byte deadline passed (counted in
 * *aborted); return the nearest future deadline (or -1 when none).  With L
 * NULL it only looks (Multi:timeout): a passed deadline is then the
 * nearest, and nothing is aborted. */
static double check_deadlines(lua_State *L, slm_multi *m, double now, int *aborted) {
  double nearest = -1;
  slm_req *r = m->ntimed > 0 ? m->head : NULL; /* libcurl keeps the others' */
  while (r) {
    slm_req *next = r->next;
    double dl = -1;
    int reason = A_NONE;
    if (r->first_byte_timeout > 0 && r->t_first == 0) {
      dl = r->t_start + r->first_byte_timeout;
      reason = A_FIRST_BYTE;
    }
    if (r->idle_timeout > 0) {
      double d2 = r->t_last + r->idle_timeout;
      if (dl < 0 || d2 < dl) { dl = d2; reason = A_IDLE; }
    }
    if (dl >= 0) {
      if (L && now >= dl) {
        r->abort_reason = reason;
        req_finish(L, r, CURLE_OPERATION_TIMEDOUT);
        (*aborted)++;
      } else if (nearest < 0 || dl < nearest) {
        nearest = dl;
      }
    }
    r = next;
  }
  return nearest;
}

/* Finish the requests libcurl reports done; returns how many. */
static int collect_done(lua_State *L, slm_multi *m) {
  CURLMsg *msg;
  int left, n = 0;
  while ((msg = curl_multi_info_read(m->multi, &left))) {
    if (msg->msg == CURLMSG_DONE) {
      slm_req *r = NULL;
      CURLcode rc = msg->data.result;
      curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&r);
      if (r && r->m == m) {
        req_finish(L, r, rc);
        n++;
      }
    }
  }
  return n;
}

/* Run libcurl's timeout handling if it is due (new requests start there). */
static void run_timer(slm_multi *m) {
  int running = 0;
  if (m->timer_at < 0 || m->timer_at > slm_now()) return;
  m->timer_at = -1; /* on_timer sets it again if libcurl asks */
  curl_multi_socket_action(m->multi, CURL_SOCKET_TIMEOUT, 0, &running);
}

#if SLM_EPOLL
/* Wait up to `ms` for the watched sockets, then hand libcurl those that
 * fired.  The kernel keeps the set (on_socket edits it as libcurl's wishes
 * change), so a step costs the sockets that are ready, not every socket
 * watched as poll() does: the scheduler calls step(0) after every task it
 * resumes, and at hundreds of requests in flight poll()'s scan of them all
 * (sock_poll, tcp_poll per socket) would be most of the client's CPU.
 * libcurl's callbacks may edit the set during the hand-over; ev[] is ours,
 * so that is safe.  A full batch is followed by more at timeout 0: epoll
 * hands out ready sockets round-robin (one reported goes to the back of its
 * ready list), so stopping once as many events as watched sockets have been
 * delivered gives each ready socket its turn and cannot loop for ever on
 * sockets that keep becoming ready. */
static void run_sockets(slm_multi *m, int ms) {
  enum { BATCH = 64 };
  struct epoll_event ev[BATCH];
  int i, n, running = 0, seen = 0, limit = m->nwatch + m->nxwatch;
  if (limit == 0 && ms == 0) return; /* nothing watched: no system call */
  do {
    /* an empty set sleeps `ms` too; -1 is EINTR (a signal): no events */
    n = epoll_wait(m->epfd, ev, BATCH, ms);
    if (n <= 0) return;
    for (i = 0; i < n; i++) {
      unsigned e = (unsigned)ev[i].events;
      int fd = ev[i].data.fd, bits;
      if (fd >= 0 && fd < m->capfd && (m->fdst[fd] & FD_EXT)) {
        if (m->fdst[fd] & FD_ARMED) {
          m->fdst[fd] = FD_EXT; /* one-shot: the kernel disarmed it too */
          xfd_fired(m, fd);
        }
        continue;
      }
      if (fd >= 0 && fd < m->capfd && !(m->fdst[fd] & FD_WANT)) {
        /* in the set but not watched by libcurl (an idle connection the
         * server closed, say): out of the set now, libcurl is not told */
        if (m->fdst[fd] & (FD_IN | FD_OUT)) m->nwatch--;
        m->fdst[fd] = 0;
        epoll_ctl(m->epfd, EPOLL_CTL_DEL, fd, NULL);
        continue;
      }
      bits = ((e & (EPOLLIN | EPOLLHUP)) ? CURL_CSELECT_IN : 0) |
             ((e & EPOLLOUT) ? CURL_CSELECT_OUT : 0) |
             ((e & EPOLLERR) ? CURL_CSELECT_ERR : 0);
      curl_multi_socket_action(m->multi, fd, bits, &running);
    }
    seen += n;
    ms = 0;
  } while (n == BATCH && seen < limit);
}
#else
/* Is fd one of the caller's (watch())?  If so it leaves pfd (one-shot). */
static int xfd_take(slm_multi *m, int fd) {
  int i, j;
  for (i = 0; i < m->nxfd; i++)
    if (m->xfd[i] == fd) break;
  if (i == m->nxfd) return 0;
  m->xfd[i] = m->xfd[--m->nxfd];
  for (j = 0; j < m->npfd; j++)
    if (m->pfd[j].fd == fd) { m->pfd[j] = m->pfd[--m->npfd]; break; }
  return 1;
}

/* Wait up to `ms` for the watched sockets, then hand libcurl those that
 * fired.  libcurl's callbacks edit m->pfd during the hand-over (sockets
 * come and go), so the fired ones are taken out in batches and the scan
 * starts over until none is left: every event is delivered once. */
static void run_sockets(slm_multi *m, int ms) {
  enum { BATCH = 64 };
  curl_socket_t fd[BATCH];
  int bits[BATCH];
  int i, k, n, running = 0;
  if (m->npfd == 0) {
    if (ms > 0) poll(NULL, 0, ms);
    return;
  }
  if (poll(m->pfd, (nfds_t)m->npfd, ms) <= 0) return;
  do {
    n = 0;
    for (i = 0; i < m->npfd && n < BATCH; i++) {
      short re = m->pfd[i].revents;
      if (!re) continue;
      m->pfd[i].revents = 0;
      fd[n] = m->pfd[i].fd;
      bits[n] = ((re & (POLLIN | POLLHUP)) ? CURL_CSELECT_IN : 0) |
                ((re & POLLOUT) ? CURL_CSELECT_OUT : 0) |
                ((re & (POLLERR | POLLNVAL)) ? CURL_CSELECT_ERR : 0);
      n++;
    }
    for (k = 0; k < n; k++) {
      if (xfd_take(m, fd[k])) xfd_fired(m, fd[k]);
      else curl_multi_socket_action(m->multi, fd[k], bits[k], &running);
    }
  } while (n == BATCH);
}
#endif

/* Push the requests with activity since the last step into the table on
 * top of the stack: the ids noted by mark_ready, or every request the weak
 * table holds when an id could not be noted. */
static void report_ready(lua_State *L, slm_multi *m) {
  int n = 0, i;
  lua_rawgeti(L, LUA_REGISTRYINDEX, m->weak_ref);
  if (m->rdy_lost) lua_pushnil(L);
  for (i = 0;; i++) {
    slm_req *q;
    if (m->rdy_lost) {
      if (!lua_next(L, -2)) break;
    } else {
      if (i >= m->nrdy) break;
      lua_pushinteger(L, m->rdy[i]);
      lua_pushvalue(L, -1);
      lua_rawget(L, -3);
    }
    /* stack: ... result weak id value */
    q = (slm_req *)luaL_testudata(L, -1, REQ_MT);
    if (q && q->ready) {
      q->ready = 0;
      lua_pushvalue(L, -1);
      slm_rawseti(L, -5, ++n);
      if (q->state == R_DONE) {
        /* finished: it leaves the weak table (reported once) */
        lua_pushvalue(L, -2);
        lua_pushnil(L);
        lua_rawset(L, -5);
      }
    }
    lua_pop(L, m->rdy_lost ? 1 : 2);
  }
  lua_pop(L, 1);
  m->nrdy = 0;
  m->rdy_lost = 0;
}

static int multi_step(lua_State *L) {
  slm_multi *m = check_multi(L, 1);
  double timeout = luaL_optnumber(L, 2, 0);
  int any = 0;
  double now, nearest;
  if (m->in_step) return luaL_error(L, "slm.core: loop already running");
  m->in_step = 1;
  run_timer(m);
  run_sockets(m, 0);
  run_timer(m);
  collect_done(L, m);
  now = slm_now();
  nearest = check_deadlines(L, m, now, &any);
  if (m->nrdy == 0 && !m->rdy_lost && m->nxrdy == 0 && !any && timeout > 0) {
    double wait = timeout;
    if (nearest >= 0 && nearest - now < wait) wait = nearest - now;
    if (m->timer_at >= 0 && m->timer_at - now < wait) wait = m->timer_at - now;
    if (wait < 0) wait = 0;
    run_sockets(m, (int)secs_to_ms(wait)); /* at most 2^31 - 1 ms (math.huge too) */
    run_timer(m);
    collect_done(L, m);
    check_deadlines(L, m, slm_now(), &any);
  }
  m->in_step = 0;
  if (m->sock_failed) {
    int err = m->sock_errno;
    m->sock_failed = 0;
    return luaL_error(L, "slm.core: cannot watch a socket: %s%s", strerror(err),
                      err == ENOSPC ? " (fs.epoll.max_user_watches reached)" : "");
  }
  lua_createtable(L, m->nrdy + m->nxrdy, 0);
  report_ready(L, m);
  if (m->nxrdy > 0) {
    int i, n = (int)lua_rawlen(L, -1);
    for (i = 0; i < m->nxrdy; i++) {
      lua_pushinteger(L, m->xrdy[i]);
      slm_rawseti(L, -2, ++n);
    }
    m->nxrdy = 0;
  }
  return 1;
}

/* Multi:watch(fd, "r" | "w" | nil): see the top of this file. */
static int multi_watch(lua_State *L) {
  slm_multi *m = check_multi(L, 1);
  lua_Integer ifd = luaL_checkinteger(L, 2);
  const char *w = luaL_optstring(L, 3, NULL);
  int fd, want = 0;
  if (ifd < 0 || ifd > 0x7fffffff) return luaL_argerror(L, 2, "not a descriptor");
  fd = (int)ifd;
  if (w) {
    if (strcmp(w, "r") == 0) want = 1;
    else if (strcmp(w, "w") == 0) want = 2;
    else return luaL_argerror(L, 3, "expected \"r\", \"w\" or nil");
  }
  /* an open descriptor, before any room is made for it: fdst grows with
   * the largest number watched (watch(2^31 - 1) must not ask for 2 GB) */
  if (want && fcntl(fd, F_GETFD) < 0) {
    int err = errno;
    return luaL_argerror(L, 2, lua_pushfstring(L, "not an open descriptor (%s)", strerror(err)));
  }
#if SLM_EPOLL
  {
    struct epoll_event ev;
    unsigned st;
    int rc;
    if (!want && fd >= m->capfd) return 0; /* never watched: nothing to forget */
    if (!fd_room(m, fd)) return luaL_error(L, "slm.core: cannot watch a descriptor: out of memory");
    st = m->fdst[fd];
    if (st & (FD_IN | FD_OUT | FD_WANT)) return luaL_argerror(L, 2, "a socket of libcurl's");
    if (!want) {
      if (st & FD_EXT) epoll_ctl(m->epfd, EPOLL_CTL_DEL, fd, NULL);
      if (st & FD_ARMED) m->nxwatch--;
      m->fdst[fd] = 0;
      return 0;
    }
    memset(&ev, 0, sizeof ev);
    ev.events = (want == 1 ? EPOLLIN : EPOLLOUT) | EPOLLONESHOT;
    ev.data.fd = fd;
    rc = epoll_ctl(m->epfd, (st & FD_EXT) ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, fd, &ev);
    /* closed without watch(fd, nil) and its number reused: start over */
    if (rc < 0 && errno == ENOENT) rc = epoll_ctl(m->epfd, EPOLL_CTL_ADD, fd, &ev);
    else if (rc < 0 && errno == EEXIST) rc = epoll_ctl(m->epfd, EPOLL_CTL_MOD, fd, &ev);
    if (rc < 0) {
      int err = errno;
      return luaL_error(L, "slm.core: cannot watch a descriptor: %s", strerror(err));
    }
    if (!(st & FD_ARMED)) m->nxwatch++;
    m->fdst[fd] = FD_EXT | FD_ARMED;
  }
#else
  {
    int i, j;
    for (j = 0; j < m->npfd; j++)
      if (m->pfd[j].fd == fd) break;
    for (i = 0; i < m->nxfd; i++)
      if (m->xfd[i] == fd) break;
    if (j < m->npfd && i == m->nxfd) return luaL_argerror(L, 2, "a socket of libcurl's");
    if (!want) {
      if (i < m->nxfd) {
        xfd_take(m, fd);
        m->nxwatch--;
      }
      return 0;
    }
    if (i == m->nxfd) {
      if (m->nxfd == m->capxfd) {
        int cap = m->capxfd ? m->capxfd * 2 : 8;
        int *p = (int *)realloc(m->xfd, (size_t)cap * sizeof *p);
        if (!p) return luaL_error(L, "slm.core: cannot watch a descriptor: out of memory");
        m->xfd = p;
        m->capxfd = cap;
      }
      if (m->npfd == m->cappfd) {
        int cap = m->cappfd ? m->cappfd * 2 : 16;
        struct pollfd *p = (struct pollfd *)realloc(m->pfd, (size_t)cap * sizeof *p);
        if (!p) return luaL_error(L, "slm.core: cannot watch a descriptor: out of memory");
        m->pfd = p;
        m->cappfd = cap;
      }
      m->xfd[m->nxfd++] = fd;
      j = m->npfd++;
      m->pfd[j].fd = fd;
      m->nxwatch++;
    }
    m->pfd[j].events = (short)(want == 1 ? POLLIN : POLLOUT);
    m->pfd[j].revents = 0;
  }
#endif
  return 0;
}

/* Multi:fd() -> the descriptor an outer event loop waits on for
 * readability (the epoll set: readable while a socket libcurl watches has
 * events), or nil where there is none (the poll() backend). */
static int multi_fd(lua_State *L) {
  slm_multi *m = check_multi(L, 1);
#if SLM_EPOLL
  lua_pushinteger(L, m->epfd);
#else
  (void)m;
  lua_pushnil(L);
#endif
  return 1;
}

/* Multi:timeout() -> seconds until step() is due even without socket
 * activity: libcurl's timer (where added requests start, and its own
 * timeouts) or the nearest first-byte/idle deadline, which step() checks
 * itself.  0: due now (a request was just added, a deadline passed, or
 * the last step() raised before it could report what it had seen); nil:
 * nothing pending but sockets.  See "Driving a multi from another event
 * loop" at the top of this file. */
static int multi_timeout(lua_State *L) {
  slm_multi *m = check_multi(L, 1);
  double due = m->timer_at, dl, now;
  int none = 0;
  if (m->nrdy > 0 || m->rdy_lost || m->sock_failed || m->nxrdy > 0) {
    lua_pushnumber(L, 0);
    return 1;
  }
  now = slm_now();
  dl = check_deadlines(NULL, m, now, &none);
  if (dl >= 0 && (due < 0 || dl < due)) due = dl;
  if (due < 0) lua_pushnil(L);
  else lua_pushnumber(L, due > now ? due - now : 0);
  return 1;
}

static int multi_count(lua_State *L) {
  slm_multi *m = (slm_multi *)luaL_checkudata(L, 1, MULTI_MT);
  lua_pushinteger(L, m->count + m->nxwatch);
  return 1;
}

static int multi_tostring(lua_State *L) {
  slm_multi *m = (slm_multi *)luaL_checkudata(L, 1, MULTI_MT);
  lua_pushfstring(L, "slm.Multi (%d in flight%s)", m->count, m->multi ? "" : ", closed");
  return 1;
}

/* ---- Request ---- */

static int req_close(lua_State *L) {
  slm_req *r = check_req(L, 1);
  if (r->m && r->m->in_step) return luaL_error(L, "slm.core: cannot close a request while the loop runs");
  if (r->state == R_RUNNING) {
    r->abort_reason = A_CANCELLED;
    req_finish(L, r, CURLE_ABORTED_BY_CALLBACK);
  }
  if (r->easy) {
    curl_easy_cleanup(r->easy);
    r->easy = NULL;
  }
  if (r->hdrs) {
    curl_slist_free_all(r->hdrs);
    r->hdrs = NULL;
  }
  if (r->body_ref != LUA_NOREF) {
    luaL_unref(L, LUA_REGISTRYINDEX, r->body_ref);
    r->body_ref = LUA_NOREF;
  }
  if (r->multi_ref != LUA_NOREF) { /* an add() that failed after taking it */
    luaL_unref(L, LUA_REGISTRYINDEX, r->multi_ref);
    r->multi_ref = LUA_NOREF;
  }
  sbuf_free(&r->body);
  sbuf_free(&r->head);
  return 0;
}

static int req_cancel(lua_State *L) {
  slm_req *r = check_req(L, 1);
  if (r->state == R_RUNNING) {
    if (r->m && r->m->in_step) return luaL_error(L, "slm.core: cannot cancel while the loop runs");
    r->abort_reason = A_CANCELLED;
    req_finish(L, r, CURLE_ABORTED_BY_CALLBACK); /* step() will not report it */
  }
  return 0;
}

static int req_read(lua_State *L) {
  slm_req *r = check_req(L, 1);
  if (r->body.len == 0) {
    lua_pushnil(L);
    return 1;
  }
  lua_pushlstring(L, r->body.p, r->body.len);
  /* keep the allocation for the next bytes unless it grew large */
  if (r->body.cap > (1u << 20)) sbuf_free(&r->body);
  else r->body.len = 0;
  return 1;
}

static int req_status(lua_State *L) {
  slm_req *r = check_req(L, 1);
  lua_pushinteger(L, (lua_Integer)r->status);
  return 1;
}

static int req_headers(lua_State *L) {
  slm_req *r = check_req(L, 1);
  const char *p, *end;
  if (!r->headers_done && r->state != R_DONE) {
    lua_pushnil(L);
    return 1;
  }
  lua_newtable(L);
  lua_pushboolean(L, r->headers_done); /* false: the reply ended inside its headers */
  if (!r->head.p) return 2;
  lua_insert(L, -2);
  p = r->head.p;
  end = p + r->head.len;
  while (p < end) {
    const char *eol = memchr(p, '\n', (size_t)(end - p));
    const char *colon, *v, *ve;
    if (!eol) eol = end;
    colon = memchr(p, ':', (size_t)(eol - p));
    if (colon && !(eol - p >= 5 && memcmp(p, "HTTP/", 5) == 0)) {
      char name[128];
      size_t k, nlen = (size_t)(colon - p);
      v = colon + 1;
      ve = eol;
      while (v < ve && (*v == ' ' || *v == '\t')) v++;
      while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t')) ve--;
      if (nlen <= sizeof name) {
        for (k = 0; k < nlen; k++) name[k] = (char)tolower((unsigned char)p[k]);
        lua_pushlstring(L, name, nlen);
      } else {
        luaL_Buffer b;
        luaL_buffinit(L, &b);
        for (k = 0; k < nlen; k++) luaL_addchar(&b, (char)tolower((unsigned char)p[k]));
        luaL_pushresult(&b);
      }
      lua_pushlstring(L, v, (size_t)(ve - v));
      lua_rawset(L, -3);
    }
    p = eol + 1;
  }
  lua_insert(L, -2);
  return 2;
}

static int req_done(lua_State *L) {
  slm_req *r = check_req(L, 1);
  lua_pushboolean(L, r->state == R_DONE);
  return 1;
}

static const char *curl_kind(CURLcode rc, int reason) {
  switch (reason) {
    case A_CANCELLED: return "cancelled";
    case A_IDLE: case A_FIRST_BYTE: return "timeout";
    case A_TOO_BIG: return "protocol";
    case A_NOMEM: return "memory";
    case A_REUSED: return "reused";
    default: break;
  }
  switch (rc) {
    case CURLE_OPERATION_TIMEDOUT: return "timeout";
    case CURLE_COULDNT_RESOLVE_PROXY: case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_CONNECT: case CURLE_SSL_CONNECT_ERROR:
    case CURLE_UNSUPPORTED_PROTOCOL: case CURLE_URL_MALFORMAT:
      return "connect";
    case CURLE_GOT_NOTHING: case CURLE_SEND_ERROR: case CURLE_RECV_ERROR:
    case CURLE_PARTIAL_FILE: case CURLE_HTTP2: case CURLE_HTTP2_STREAM:
    case CURLE_WEIRD_SERVER_REPLY:
      return "broken";
    default: return "transport";
  }
}

static int req_result(lua_State *L) {
  slm_req *r = check_req(L, 1);
  const char *msg;
  if (r->state != R_DONE) {
    lua_pushnil(L);
    lua_pushliteral(L, "running");
    return 2;
  }
  if (r->result == CURLE_OK && r->abort_reason == A_NONE) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushnil(L);
  lua_pushstring(L, curl_kind(r->result, r->abort_reason));
  switch (r->abort_reason) {
    case A_CANCELLED: lua_pushliteral(L, "request cancelled"); break;
    case A_IDLE: lua_pushfstring(L, "stalled: no data for %f s", r->idle_timeout); break;
    case A_FIRST_BYTE: lua_pushfstring(L, "no first byte within %f s", r->first_byte_timeout); break;
    case A_TOO_BIG:
      lua_pushfstring(L, "reply larger than max_body (%f bytes)", (lua_Number)r->max_body);
      break;
    case A_NOMEM: lua_pushliteral(L, "out of memory buffering the reply"); break;
    case A_REUSED:
      lua_pushliteral(L, "the reused connection closed before replying; libcurl's re-send was stopped");
      break;
    default:
      msg = r->errbuf[0] ? r->errbuf : curl_easy_strerror(r->result);
      lua_pushstring(L, msg);
  }
  lua_pushinteger(L, (lua_Integer)r->result);
  return 4;
}

static int req_info(lua_State *L) {
  slm_req *r = check_req(L, 1);
  lua_newtable(L);
  lua_pushnumber(L, r->t_start);
  lua_setfield(L, -2, "started");
  if (r->t_first > 0) {
    lua_pushnumber(L, r->t_first - r->t_start);
    lua_setfield(L, -2, "ttfb");
  }
  lua_pushinteger(L, (lua_Integer)r->received);
  lua_setfield(L, -2, "received");
  if (r->info.have) {
    long v = r->info.http_version;
    lua_pushnumber(L, r->info.total_time);
    lua_setfield(L, -2, "total_time");
    lua_pushnumber(L, r->info.connect_time);
    lua_setfield(L, -2, "connect_time");
    lua_pushinteger(L, (lua_Integer)r->info.new_connections);
    lua_setfield(L, -2, "new_connections");
    lua_pushstring(L, v == CURL_HTTP_VERSION_2_0 ? "2" : v == CURL_HTTP_VERSION_3 ? "3" :
                      v == CURL_HTTP_VERSION_1_0 ? "1.0" : "1.1");
    lua_setfield(L, -2, "http_version");
    if (r->info.ip[0]) {
      lua_pushstring(L, r->info.ip);
      lua_setfield(L, -2, "ip");
    }
  }
  return 1;
}

static int req_id(lua_State *L) {
  slm_req *r = check_req(L, 1);
  lua_pushinteger(L, r->id);
  return 1;
}

static int req_last_activity(lua_State *L) {
  slm_req *r = check_req(L, 1);
  lua_pushnumber(L, r->t_last);
  return 1;
}

static int req_tostring(lua_State *L) {
  slm_req *r = check_req(L, 1);
  static const char *states[] = {"idle", "running", "done"};
  lua_pushfstring(L, "slm.Request #%d (%s, status %d)", (int)r->id, states[r->state], (int)r->status);
  return 1;
}

/* core.http_initialized() -> whether this process has set libcurl up */
static int l_http_initialized(lua_State *L) {
  int ready;
  pthread_mutex_lock(&curl_lock);
  ready = curl_ready;
  pthread_mutex_unlock(&curl_lock);
  lua_pushboolean(L, ready);
  return 1;
}

/* __index of the module table: the fields that describe libcurl, computed
 * once libcurl is set up, then stored in the table (no second lookup). */
static int curl_field(lua_State *L) {
  const char *k;
  if (lua_type(L, 2) != LUA_TSTRING) return 0;
  k = lua_tostring(L, 2);
  if (strcmp(k, "curl_version") == 0) {
    need_curl(L);
    lua_pushstring(L, curl_facts.version);
  } else if (strcmp(k, "http2") == 0) {
    need_curl(L);
    lua_pushboolean(L, curl_facts.http2);
  } else if (strcmp(k, "h2c_reuse") == 0) {
    need_curl(L);
    lua_pushboolean(L, h2c_reuse);
  } else if (strcmp(k, "resend_guard") == 0) {
    need_curl(L); /* built and running with 7.80 or newer: see on_prereq */
    lua_pushboolean(L, SLM_PREREQ && curl_facts.version_num >= 0x075000);
  } else {
    return 0; /* nil, as for any absent field */
  }
  lua_pushvalue(L, 2);
  lua_pushvalue(L, -2);
  lua_rawset(L, 1);
  return 1;
}

int slm_open_http(lua_State *L) {
  static const luaL_Reg multi_m[] = {
    {"add", multi_add}, {"step", multi_step}, {"count", multi_count},
    {"fd", multi_fd}, {"timeout", multi_timeout}, {"watch", multi_watch},
    {"close", multi_close}, {NULL, NULL}
  };
  static const luaL_Reg req_m[] = {
    {"read", req_read}, {"status", req_status}, {"headers", req_headers},
    {"done", req_done}, {"result", req_result}, {"cancel", req_cancel},
    {"info", req_info}, {"id", req_id}, {"last_activity", req_last_activity},
    {"close", req_close}, {NULL, NULL}
  };
  static const luaL_Reg fns[] = {
    {"multi", l_multi}, {"http_initialized", l_http_initialized}, {NULL, NULL}
  };
  slm_new_class(L, MULTI_MT, multi_m, multi_close, multi_tostring);
  slm_new_class(L, REQ_MT, req_m, req_close, req_tostring);
  luaL_setfuncs(L, fns, 0);
  /* the fields that describe libcurl are read through the module's
   * metatable: reading one is a use of libcurl (see curl_init) */
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, curl_field);
  lua_setfield(L, -2, "__index");
  lua_setmetatable(L, -2);
  lua_pushstring(L, SLM_EPOLL ? "epoll" : "poll");
  lua_setfield(L, -2, "events");
  return 0;
}
