/*
 * tcp.c - a non-blocking TCP client socket (slm.Tcp), for the protocols the
 * Lua layer speaks itself on the libcurl runtime's loop (Redis' RESP).
 *
 * No I/O waits here: every call returns at once, "again" when the kernel
 * has nothing to give or no room to take.  The caller arms the descriptor
 * with Multi:watch(fd, "r" | "w") (http.c) and the scheduler wakes its task
 * when step() reports it ready, so a slow server never blocks the loop.
 * No bytes are parsed in C.
 *
 * Lua API (module slm.core):
 *   core.tcp_connect(host, port) -> Tcp | nil, message
 *     starts connecting (numeric addresses connect without any lookup; a
 *     name is resolved with getaddrinfo, which may block: give Redis an
 *     address); wait for "w", then call Tcp:connected()
 *   Tcp:connected() -> true | nil, message     (the connect's outcome)
 *   Tcp:send(s [, i]) -> index of the last byte sent (i - 1: nothing, the
 *                        buffer is full) | nil, message
 *   Tcp:recv([max]) -> up to max (16384) bytes | false (nothing yet) | nil, message
 *                      (message "closed" when the peer closed it)
 *   Tcp:fd() -> integer (-1 once closed)
 *   Tcp:close()          (idempotent; also __gc and __close)
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>
#include "slm.h"

#define TCP_MT "slm.Tcp"
#define RECV_MAX 16384 /* bytes per recv() */

#ifndef MSG_NOSIGNAL
#  define MSG_NOSIGNAL 0
#endif

typedef struct {
  int fd;
} slm_tcp;

static slm_tcp *check_tcp(lua_State *L) {
  slm_tcp *t = (slm_tcp *)luaL_checkudata(L, 1, TCP_MT);
  if (t->fd < 0) luaL_error(L, "slm.core: the socket is closed");
  return t;
}

static int fail(lua_State *L, const char *what, int err) {
  lua_pushnil(L);
  lua_pushfstring(L, "%s: %s", what, strerror(err));
  return 2;
}

static int l_tcp_connect(lua_State *L) {
  const char *host = luaL_checkstring(L, 1);
  lua_Integer port = luaL_checkinteger(L, 2);
  struct addrinfo hints, *res = NULL;
  char service[16];
  slm_tcp *t;
  int rc, one = 1;
  if (port <= 0 || port > 65535) return luaL_argerror(L, 2, "not a port number");
  /* the safe closed state first */
  t = (slm_tcp *)slm_newuserdata(L, sizeof *t);
  t->fd = -1;
  luaL_setmetatable(L, TCP_MT);
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
  snprintf(service, sizeof service, "%d", (int)port);
  rc = getaddrinfo(host, service, &hints, &res);
  if (rc == EAI_NONAME) {
    hints.ai_flags = AI_NUMERICSERV;
    rc = getaddrinfo(host, service, &hints, &res);
  }
  if (rc != 0 || !res) {
    lua_pushnil(L);
    lua_pushfstring(L, "cannot resolve %s: %s", host, gai_strerror(rc));
    return 2;
  }
  t->fd = socket(res->ai_family, SOCK_STREAM, 0);
  if (t->fd < 0) {
    int err = errno;
    freeaddrinfo(res);
    return fail(L, "socket", err);
  }
  fcntl(t->fd, F_SETFD, FD_CLOEXEC);
  if (fcntl(t->fd, F_SETFL, fcntl(t->fd, F_GETFL) | O_NONBLOCK) < 0) {
    int err = errno;
    freeaddrinfo(res);
    return fail(L, "fcntl", err);
  }
  setsockopt(t->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  rc = connect(t->fd, res->ai_addr, res->ai_addrlen);
  freeaddrinfo(res);
  if (rc < 0 && errno != EINPROGRESS) return fail(L, "connect", errno);
  return 1; /* the socket: connected or connecting */
}

static int tcp_connected(lua_State *L) {
  slm_tcp *t = check_tcp(L);
  int err = 0;
  socklen_t len = sizeof err;
  if (getsockopt(t->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
  if (err) return fail(L, "connect", err);
  lua_pushboolean(L, 1);
  return 1;
}

static int tcp_send(lua_State *L) {
  slm_tcp *t = check_tcp(L);
  size_t len;
  const char *s = luaL_checklstring(L, 2, &len);
  lua_Integer i = luaL_optinteger(L, 3, 1);
  ssize_t n;
  if (i < 1 || (size_t)i > len + 1) return luaL_argerror(L, 3, "out of range");
  if ((size_t)i > len) {
    lua_pushinteger(L, (lua_Integer)len);
    return 1;
  }
  do {
    n = send(t->fd, s + i - 1, len - (size_t)(i - 1), MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) n = 0;
    else return fail(L, "send", errno);
  }
  lua_pushinteger(L, i - 1 + (lua_Integer)n);
  return 1;
}

static int tcp_recv(lua_State *L) {
  slm_tcp *t = check_tcp(L);
  lua_Integer max = luaL_optinteger(L, 2, RECV_MAX);
  char p[RECV_MAX]; /* on the stack: nothing to free if anything raises */
  ssize_t n;
  if (max < 1) return luaL_argerror(L, 2, "must be positive");
  if (max > RECV_MAX) max = RECV_MAX;
  do {
    n = recv(t->fd, p, (size_t)max, 0);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    int err = errno;
    if (err == EAGAIN || err == EWOULDBLOCK) {
      lua_pushboolean(L, 0);
      return 1;
    }
    return fail(L, "recv", err);
  }
  if (n == 0) {
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
  }
  lua_pushlstring(L, p, (size_t)n);
  return 1;
}

static int tcp_fd(lua_State *L) {
  slm_tcp *t = (slm_tcp *)luaL_checkudata(L, 1, TCP_MT);
  lua_pushinteger(L, t->fd);
  return 1;
}

static int tcp_close(lua_State *L) {
  slm_tcp *t = (slm_tcp *)luaL_checkudata(L, 1, TCP_MT);
  if (t->fd >= 0) {
    close(t->fd);
    t->fd = -1;
  }
  return 0;
}

static int tcp_tostring(lua_State *L) {
  slm_tcp *t = (slm_tcp *)luaL_checkudata(L, 1, TCP_MT);
  lua_pushfstring(L, "slm.Tcp (fd %d)", t->fd);
  return 1;
}

int slm_open_tcp(lua_State *L) {
  static const luaL_Reg tcp_m[] = {
    {"connected", tcp_connected}, {"send", tcp_send}, {"recv", tcp_recv},
    {"fd", tcp_fd}, {"close", tcp_close}, {NULL, NULL}
  };
  slm_new_class(L, TCP_MT, tcp_m, tcp_close, tcp_tostring);
  lua_pushcfunction(L, l_tcp_connect);
  lua_setfield(L, -2, "tcp_connect");
  return 0;
}
