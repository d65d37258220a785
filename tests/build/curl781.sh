#!/usr/bin/env bash
# tests/build/curl781.sh: does csrc/ still build against libcurl 7.81.0?
#
# The oldest libcurl we support is 7.81.0 (Ubuntu 22.04's), and no package
# of it exists on the Debian 12 machines we build on (7.88.1).  So this
# makes 7.81's headers out of the system's: it copies them to a temporary
# directory, says 7.81.0 in curlver.h, and takes out of curl.h, multi.h and
# typecheck-gcc.h what libcurl added after 7.81.0:
#   - options numbered above 7.81's last (CURLOPT_MIME_OPTIONS, 315) and
#     multi options above CURLMOPT_MAX_CONCURRENT_STREAMS (16);
#   - infos above CURLINFO_REFERER (60), error codes above
#     CURLE_SSL_CLIENTCERT (98), feature bits from CURL_VERSION_THREADSAFE
#     (1<<30) on, CURL_HTTP_VERSION_3ONLY;
#   - header.h (curl_easy_header & co., 7.83), websockets.h (7.86), and the
#     functions added later to curl.h and multi.h;
#   - the deprecation attributes (7.87): -DCURL_DISABLE_DEPRECATION.
# Then it compiles every csrc/*.c against them (http.c for both event
# backends) with the project's warnings and -Werror, -fsyntax-only.
#   tests/build/curl781.sh        exit 0 and "curl781: PASS ..." when all build
# Needs: cc, perl, pkg-config with libcurl and lua5.4.
set -euo pipefail
cd "$(dirname "$0")/../.."
CC=${CC:-cc}

fail() { echo "curl781: FAIL: $*"; exit 1; }

curl_cflags=$(pkg-config --cflags libcurl) || fail "pkg-config knows no libcurl"
lua_cflags=$(pkg-config --cflags lua5.4) || fail "pkg-config knows no lua5.4"
# where the compiler finds <curl/curl.h> (Debian: /usr/include/<multiarch>/curl)
# shellcheck disable=SC2086
deps=$(echo '#include <curl/curl.h>' | "$CC" $curl_cflags -M -x c - 2>/dev/null) || fail "cannot find curl/curl.h"
hdr=$(printf '%s\n' $deps | grep '/curl/curl\.h$' | head -n1)
[ -n "$hdr" ] || fail "cannot find curl/curl.h"
src=$(dirname "$hdr")

tmp=$(mktemp -d /tmp/slm-curl781.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/curl"
cp "$src"/*.h "$tmp/curl/"
cd "$tmp/curl"

perl -0777 -pi -e '
  s/^(#define LIBCURL_VERSION )".*"/$1"7.81.0"/m;
  s/^(#define LIBCURL_VERSION_MINOR ).*/${1}81/m;
  s/^(#define LIBCURL_VERSION_PATCH ).*/${1}0/m;
  s/^(#define LIBCURL_VERSION_NUM ).*/${1}0x075100/m;' curlver.h

# Takes out of the files named what came after 7.81.0; prints the names.
perl -0777 -i -ne '
  my @gone;
  # CURLOPT(NAME, TYPE, N), and CURLOPTDEPRECATED(NAME, TYPE, N, ver, msg),
  s{^[ \t]*CURLOPT(?:DEPRECATED)?\((CURLM?OPT_\w+),\s*CURLOPTTYPE_\w+,\s*(\d+)[^)]*\),[ \t]*\n}{
    my ($all, $n, $v) = ($&, $1, $2);
    $v > (substr($n, 0, 8) eq "CURLOPT_" ? 315 : 16) ? (push(@gone, $n), "") : $all
  }gme;
  s{^[ \t]*(CURLINFO_\w+)\s*=\s*CURLINFO_\w+\s*\+\s*(\d+),[^\n]*\n}{
    $2 > 60 ? (push(@gone, $1), "") : $&
  }gme;
  s{^([ \t]*CURLINFO_LASTONE\s*=\s*)\d+}{${1}60}m;
  s{^[ \t]*(CURLE_\w+),\s*/\*\s*(\d+)\b[^\n]*\n}{
    $2 > 98 ? (push(@gone, $1), "") : $&
  }gme;
  s{^#define[ \t]+(CURL_VERSION_\w+)[ \t]+\(1<<(\d+)\)[^\n]*\n}{
    $2 >= 30 ? (push(@gone, $1), "") : $&
  }gme;
  s{^[ \t]*(CURL_HTTP_VERSION_3ONLY)\s*=\s*\d+,(?:[ \t]*/\*.*?\*/)?[ \t]*\n}{push(@gone, $1); ""}gmse;
  s{^#include "(header|websockets)\.h"[^\n]*\n}{push(@gone, "$1.h"); ""}gme;
  for my $f (qw(curl_global_trace curl_easy_ssls_import curl_easy_ssls_export
                curl_multi_get_handles curl_multi_waitfds curl_multi_get_offt
                curl_multi_notify_enable curl_multi_notify_disable)) {
    push(@gone, $f) if s{CURL_EXTERN[^;]*?\b\Q$f\E\s*\([^;]*;[ \t]*\n}{}s;
  }
  print;
  open(my $g, ">>", "'"$tmp"'/gone") or die; print $g "$_\n" for @gone;' curl.h multi.h
rm -f header.h websockets.h
# typecheck-gcc.h lists option names: drop the lines naming what is gone
if [ -s "$tmp/gone" ]; then
  grep -vwF -f "$tmp/gone" typecheck-gcc.h > typecheck-gcc.h.new || true
  mv typecheck-gcc.h.new typecheck-gcc.h
fi

# the cut must have happened, or this check proves nothing
grep -q '^#define LIBCURL_VERSION_NUM 0x075100' curlver.h || fail "curlver.h not rewritten"
declared() { # is symbol $1 declared by the cut headers?
  printf '#include <curl/curl.h>\nint main(void) { (void)%s; return 0; }\n' "$1" |
    "$CC" -fsyntax-only -Werror -DCURL_DISABLE_DEPRECATION -I"$tmp" -x c - 2>/dev/null
}
for sym in CURLOPT_PROTOCOLS_STR CURLINFO_CAPATH CURL_VERSION_THREADSAFE curl_easy_header \
           CURLE_UNRECOVERABLE_POLL CURL_HTTP_VERSION_3ONLY; do
  if declared "$sym"; then fail "$sym (after 7.81.0) is still declared"; fi
done
for sym in CURLOPT_PREREQFUNCTION CURLOPT_MIME_OPTIONS CURLINFO_REFERER CURLE_SSL_CLIENTCERT; do
  declared "$sym" || fail "$sym (7.81.0 has it) was taken out too"
done
echo "curl781: headers of $(sed -n 's/^#define LIBCURL_VERSION "\(.*\)"/\1/p' "$src/curlver.h") cut to 7.81.0 ($(wc -l < "$tmp/gone") symbols out)"

cd - >/dev/null
flags=(-std=c99 -O2 -fsyntax-only -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes
       -Wmissing-prototypes -Wno-unused-parameter -DCURL_DISABLE_DEPRECATION -I"$tmp")
n=0 bad=0
# shellcheck disable=SC2086
for f in csrc/*.c; do
  for defs in "" "-DSLM_EVENTS_POLL"; do
    if [ -n "$defs" ] && [ "$f" != csrc/http.c ]; then continue; fi
    n=$((n + 1))
    if ! "$CC" "${flags[@]}" $defs $lua_cflags -Icsrc "$f" 2> "$tmp/err"; then
      bad=$((bad + 1))
      echo "curl781: $f ${defs:-(epoll)} does not build against libcurl 7.81.0:"
      sed 's/^/  /' "$tmp/err" | head -20
    fi
  done
done
[ "$bad" -eq 0 ] || fail "$bad of $n compilations failed"
echo "curl781: PASS ($n compilations of csrc/ against libcurl 7.81.0 headers)"
