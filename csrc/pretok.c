/*
 * pretok.c - pre-tokenizers: the split regexes of cl100k_base, o200k_base
 * and Llama 3, matched by hand (no regex engine) over the Unicode class
 * table generated into unicode_tab.c.
 *
 * Each slm_pretok_next() call returns the piece a backtracking regex engine
 * (tiktoken's fancy-regex) would match at the current position: the first
 * alternative that matches, with the match its greedy/backtracking order
 * finds first.  Every function below scans forward only and touches each
 * character a bounded number of times, so splitting is linear in the input.
 *
 * Classes: \p{L} letters, \p{N} numbers, \s the Unicode White_Space
 * property, o200k's U = [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}] and
 * W = [\p{Ll}\p{Lm}\p{Lo}\p{M}].  P = [^\r\n\p{L}\p{N}] (the optional prefix
 * of a word) and O = [^\s\p{L}\p{N}] (punctuation and symbols).
 *
 * Input that is not valid UTF-8: each byte that does not start a complete,
 * well-formed sequence is one character of no class (so it is P and O, like
 * the U+FFFD a lossy decoder would put there).  Pieces are byte ranges that
 * tile the input, so decoding the tokens always gives the input back.
 */
#include "pretok.h"
#include "unicode_tab.h"

#include <string.h>

#define UC_END 0x80u /* position is past the end of the input */

#define IS_P(f, b) (!((f) & (UC_L | UC_N | UC_END)) && (b) != '\r' && (b) != '\n')
#define IS_O(f) (!((f) & (UC_S | UC_L | UC_N | UC_END)))

/* Length of a well-formed UTF-8 sequence at i and its code point; 0 when
 * the byte at i does not start one. */
static size_t utf8_decode(const unsigned char *s, size_t len, size_t i,
                          unsigned long *cp) {
  unsigned b0 = s[i], b1, b2, b3;
  size_t avail = len - i;
  if (b0 < 0x80) { *cp = b0; return 1; }
  if (b0 < 0xC2) return 0;
  if (b0 < 0xE0) {
    if (avail < 2 || (s[i + 1] & 0xC0) != 0x80) return 0;
    *cp = ((unsigned long)(b0 & 0x1F) << 6) | (s[i + 1] & 0x3F);
    return 2;
  }
  if (b0 < 0xF0) {
    if (avail < 3) return 0;
    b1 = s[i + 1]; b2 = s[i + 2];
    if ((b1 & 0xC0) != 0x80 || (b2 & 0xC0) != 0x80) return 0;
    if (b0 == 0xE0 && b1 < 0xA0) return 0;  /* overlong */
    if (b0 == 0xED && b1 >= 0xA0) return 0; /* surrogate */
    *cp = ((unsigned long)(b0 & 0x0F) << 12) | ((unsigned long)(b1 & 0x3F) << 6) |
          (b2 & 0x3F);
    return 3;
  }
  if (b0 < 0xF5) {
    if (avail < 4) return 0;
    b1 = s[i + 1]; b2 = s[i + 2]; b3 = s[i + 3];
    if ((b1 & 0xC0) != 0x80 || (b2 & 0xC0) != 0x80 || (b3 & 0xC0) != 0x80) return 0;
    if (b0 == 0xF0 && b1 < 0x90) return 0;  /* overlong */
    if (b0 == 0xF4 && b1 >= 0x90) return 0; /* above U+10FFFF */
    *cp = ((unsigned long)(b0 & 0x07) << 18) | ((unsigned long)(b1 & 0x3F) << 12) |
          ((unsigned long)(b2 & 0x3F) << 6) | (b3 & 0x3F);
    return 4;
  }
  return 0;
}

/* Class flags of the character at i and its length in *n.  The generator
 * emits the block of U+0000..U+00FF first, so ASCII indexes stage2 directly. */
static inline unsigned char_at(const unsigned char *s, size_t len, size_t i,
                               size_t *n) {
  unsigned long cp;
  size_t k;
  if (i >= len) { *n = 0; return UC_END; }
  if (s[i] < 0x80) { *n = 1; return slm_uc_stage2[s[i]]; }
  k = utf8_decode(s, len, i, &cp);
  if (k == 0) { *n = 1; return 0; }
  *n = k;
  return slm_uc_flags(cp);
}

/* End of the run of characters from j whose flags include `want` (ASCII
 * bytes go through a tight loop; the rest through char_at). */
static inline size_t run_of(const unsigned char *s, size_t len, size_t j, unsigned want) {
  for (;;) {
    size_t n;
    while (j < len && s[j] < 0x80 && (slm_uc_stage2[s[j]] & want)) j++;
    if (j >= len || s[j] < 0x80 || !(char_at(s, len, j, &n) & want)) return j;
    j += n;
  }
}

size_t slm_utf8_len(const unsigned char *s, size_t len, size_t pos) {
  unsigned long cp;
  size_t k = utf8_decode(s, len, pos, &cp);
  return k ? k : 1;
}

size_t slm_utf8_floor(const unsigned char *s, size_t len, size_t pos) {
  size_t k;
  unsigned long cp;
  if (pos >= len) return len;
  /* A well-formed sequence starting up to 3 bytes back that reaches past
   * pos contains it; continuation bytes never start one, so at most one
   * candidate can. */
  for (k = 1; k <= 3 && k <= pos; k++) {
    size_t n = utf8_decode(s, len, pos - k, &cp);
    if (n > k) return pos - k;
    if ((s[pos - k] & 0xC0) != 0x80) break;
  }
  return pos;
}

/* (?i:'s|'t|'re|'ve|'m|'ll|'d) at j: its length, or 0.  Case-insensitive
 * matching uses Unicode simple case folding, under which U+017F (long s)
 * matches "s"; no other non-ASCII character folds to these letters. */
static inline size_t contraction(const unsigned char *s, size_t len, size_t j) {
  unsigned c, d;
  if (j + 1 >= len || s[j] != '\'') return 0;
  c = s[j + 1] | 0x20u;
  if (c == 's' || c == 't' || c == 'm' || c == 'd') return 2;
  if (s[j + 1] == 0xC5 && j + 2 < len && s[j + 2] == 0xBF) return 3;
  if (j + 2 < len) {
    d = s[j + 2] | 0x20u;
    if ((c == 'r' && d == 'e') || (c == 'v' && d == 'e') || (c == 'l' && d == 'l'))
      return 3;
  }
  return 0;
}

/* \s*[\r\n]+ | \s+(?!\S) | \s+  at i, where the character at i is \s.
 * (cl100k's \s*[\r\n] ends at the same place as \s*[\r\n]+.) */
static size_t space_run(const unsigned char *s, size_t len, size_t i) {
  size_t j = i, last = i, nl = 0, n;
  int have_nl = 0;
  while (char_at(s, len, j, &n) & UC_S) {
    if (s[j] == '\r' || s[j] == '\n') { nl = j; have_nl = 1; }
    last = j;
    j += n;
  }
  if (have_nl) return nl + 1;     /* \s*[\r\n]: up to the last newline */
  if (j >= len) return j;         /* \s+(?!\S) at the end of the input */
  if (last > i) return last;      /* \s+(?!\S): give back the last one */
  return j;                       /* \s+: a single character before \S */
}

/* ?[^\s\p{L}\p{N}]+ followed by [\r\n]* (or [\r\n/]* for o200k) at i; 0 when
 * it does not match. */
static size_t punct_run(const unsigned char *s, size_t len, size_t i,
                        unsigned f0, size_t n0, int slash) {
  size_t j = i, n;
  unsigned f = f0;
  if (s[i] == ' ') {
    f = char_at(s, len, i + 1, &n);
    if (!IS_O(f)) return 0;
    j = i + 1;
  } else if (!IS_O(f0)) {
    return 0;
  } else {
    n = n0;
  }
  do {
    j += n;
    f = char_at(s, len, j, &n);
  } while (IS_O(f));
  while (j < len && (s[j] == '\r' || s[j] == '\n' || (slash && s[j] == '/'))) j++;
  return j;
}

static size_t digits3(const unsigned char *s, size_t len, size_t i, size_t n) {
  int k;
  size_t m;
  i += n;
  for (k = 1; k < 3; k++) {
    if (!(char_at(s, len, i, &m) & UC_N)) break;
    i += m;
  }
  return i;
}

/* cl100k_base:
 *   '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}|
 *   ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+
 * Llama 3:
 *   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
 *   ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
 * The two match the same pieces: the possessive forms cannot change the
 * outcome (the prefix is never a letter; punctuation never includes \r\n),
 * and \s*[\r\n]+ stops at the same last newline as \s*[\r\n]. */
static size_t next_cl100k(const unsigned char *s, size_t len, size_t i) {
  size_t n0, n, e;
  unsigned f0 = char_at(s, len, i, &n0);
  unsigned b0 = s[i];
  if (b0 == '\'' && (e = contraction(s, len, i)) != 0) return i + e;
  /* [^\r\n\p{L}\p{N}]?\p{L}+ */
  if (f0 & UC_L) return run_of(s, len, i + n0, UC_L);
  if (IS_P(f0, b0) && (char_at(s, len, i + n0, &n) & UC_L))
    return run_of(s, len, i + n0 + n, UC_L);
  if (f0 & UC_N) return digits3(s, len, i, n0);
  if ((e = punct_run(s, len, i, f0, n0, 0)) != 0) return e;
  if (f0 & UC_S) return space_run(s, len, i);
  return i + n0; /* not reached: every character is L, N, O or \s */
}

/* o200k alternative 1 with the word starting at `start`:
 *   [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|...)?
 * U* takes the whole U run; if a W character follows, W+ takes the W run.
 * Otherwise U* backtracks to the last character of the run that is also W
 * (Lm, Lo or a mark) and W+ matches just that one (what follows it is U
 * but not W, or the end of the run).  0 when there is no such character. */
static size_t o200k_lower(const unsigned char *s, size_t len, size_t start) {
  size_t j = start, n, both_end = 0;
  unsigned f;
  for (;;) {
    f = char_at(s, len, j, &n);
    if (!(f & UC_U)) break;
    if (f & UC_W) both_end = j + n;
    j += n;
  }
  if (f & UC_W) {
    j = run_of(s, len, j + n, UC_W);
    return j + contraction(s, len, j);
  }
  if (both_end) return both_end + contraction(s, len, both_end);
  return 0;
}

/* o200k alternative 2 from `start`:
 *   [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|...)? */
static size_t o200k_upper(const unsigned char *s, size_t len, size_t start) {
  size_t j = start, n;
  unsigned f = char_at(s, len, j, &n);
  if (!(f & UC_U)) return 0;
  j = run_of(s, len, j + n, UC_U);
  j = run_of(s, len, j, UC_W);
  return j + contraction(s, len, j);
}

/* o200k_base:
 *   [^\r\n\p{L}\p{N}]?[ULtLmLoM]*[LlLmLoM]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|
 *   [^\r\n\p{L}\p{N}]?[ULtLmLoM]+[LlLmLoM]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|
 *   \p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
 * The optional prefix is tried present first, then absent; it can only be
 * absent-and-still-match when it is a mark (a mark is P and also U and W). */
/* ASCII fast path for the commonest o200k pieces (" word", "Word",
 * "HTML", "it's"): an optional ASCII prefix [^\r\n\p{L}\p{N}], then
 * [A-Z]*[a-z]*, then the optional contraction.  On ASCII these are exactly
 * what alternatives 1 and 2 below match (an uppercase run followed by a
 * lowercase run is alternative 1; an uppercase run alone, alternative 2).
 * Returns 0 whenever a byte >= 0x80 could change the answer, or the piece
 * is not a word: the general matcher decides then. */
static size_t o200k_ascii_word(const unsigned char *s, size_t len, size_t i) {
  size_t j = i;
  unsigned c = s[j];
  if (!((c | 0x20u) >= 'a' && (c | 0x20u) <= 'z')) {
    if (c >= 0x80 || c == '\r' || c == '\n' || (c >= '0' && c <= '9')) return 0;
    j++;
    if (j >= len) return 0;
    c = s[j];
    if (!((c | 0x20u) >= 'a' && (c | 0x20u) <= 'z')) return 0;
  }
  while (j < len && s[j] >= 'A' && s[j] <= 'Z') j++;
  while (j < len && s[j] >= 'a' && s[j] <= 'z') j++;
  if (j < len && s[j] >= 0x80) return 0;
  return j + contraction(s, len, j);
}

/* The general o200k matcher (kind "o200k_general" selects it alone, so the
 * tests can check the fast path against it). */
static size_t next_o200k_general(const unsigned char *s, size_t len, size_t i) {
  size_t n0, e;
  unsigned f0;
  f0 = char_at(s, len, i, &n0);
  unsigned b0 = s[i];
  int p = IS_P(f0, b0);
  int w = (f0 & (UC_U | UC_W)) != 0;
  if (p || w) {
    if (p && (e = o200k_lower(s, len, i + n0)) != 0) return e;
    if (w && (e = o200k_lower(s, len, i)) != 0) return e;
    if (p && (e = o200k_upper(s, len, i + n0)) != 0) return e;
    if (w && (e = o200k_upper(s, len, i)) != 0) return e;
  }
  if (f0 & UC_N) return digits3(s, len, i, n0);
  if ((e = punct_run(s, len, i, f0, n0, 1)) != 0) return e;
  if (f0 & UC_S) return space_run(s, len, i);
  return i + n0; /* not reached */
}

static size_t next_o200k(const unsigned char *s, size_t len, size_t i) {
  size_t e;
  if (s[i] < 0x80 && (e = o200k_ascii_word(s, len, i)) != 0) return e;
  return next_o200k_general(s, len, i);
}

int slm_pretok_kind(const char *name) {
  if (strcmp(name, "cl100k") == 0) return SLM_PRETOK_CL100K;
  if (strcmp(name, "o200k") == 0) return SLM_PRETOK_O200K;
  if (strcmp(name, "o200k_general") == 0) return SLM_PRETOK_O200K_GENERAL;
  if (strcmp(name, "llama3") == 0) return SLM_PRETOK_LLAMA3;
  return -1;
}

size_t slm_pretok_next(int kind, const unsigned char *s, size_t len, size_t pos) {
  if (kind == SLM_PRETOK_O200K) return next_o200k(s, len, pos);
  if (kind == SLM_PRETOK_O200K_GENERAL) return next_o200k_general(s, len, pos);
  return next_cl100k(s, len, pos);
}
