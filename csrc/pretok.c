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

/* ------------------------------------------------------ ASCII fast paths
 *
 * Most pieces of most text are ASCII: " word", "Word", ",", " ", "123".
 * The fast paths below decide such a piece from a few byte comparisons and
 * the ASCII part of the class table, and return 0 whenever a byte >= 0x80
 * could change the answer (a non-ASCII letter continuing a word, a
 * non-ASCII space continuing a run, ...): the general matcher decides then.
 * The tests and the fuzzer check them against the general matchers (kinds
 * "o200k_general" and "cl100k_general"). */

#define A_FLAGS(c) (slm_uc_stage2[(c)]) /* class flags of an ASCII byte */
#define A_LETTER(c) ((unsigned)((c) | 0x20u) - 'a' < 26u)
#define A_DIGIT(c) ((unsigned)(c) - '0' < 10u)
#define A_O(c) (!(A_FLAGS(c) & (UC_S | UC_L | UC_N))) /* ASCII O */

/* The fast paths are inlined into slm_pretok_split's loop (the compiler
 * would otherwise keep some of them as calls). */
#if defined(__GNUC__)
#define FAST_PATH static inline __attribute__((always_inline))
#else
#define FAST_PATH static inline
#endif

/* End of the run from j of bytes that are in [lo, hi] (ASCII) once OR-ed
 * with the low byte of `fold` (repeated in each of its bytes).  Words are
 * scanned eight bytes at a time where the compiler lets us count trailing
 * zeros: one data-dependent exit per run instead of a branch per byte,
 * which a CPU mispredicts at the end of nearly every word. */
#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define SWAR_ONES 0x0101010101010101ull
#define SWAR_HIGH 0x8080808080808080ull
/* High bit of each byte of v set iff that byte is in [lo, hi] (< 0x80):
 * adding 0x80 - lo (or 0x7F - hi) to its low 7 bits never carries out of
 * the byte and sets the high bit iff it is >= lo (> hi). */
static inline uint64_t swar_in(uint64_t v, unsigned lo, unsigned hi) {
  uint64_t x = v & ~SWAR_HIGH;
  uint64_t ge = x + SWAR_ONES * (0x80u - lo), gt = x + SWAR_ONES * (0x7Fu - hi);
  return ge & ~gt & ~v & SWAR_HIGH;
}
FAST_PATH size_t ascii_run(const unsigned char *s, size_t len, size_t j,
                           unsigned lo, unsigned hi, uint64_t fold) {
  while (j + 8 <= len) {
    uint64_t v, out;
    memcpy(&v, s + j, 8);
    out = ~swar_in(v | fold, lo, hi) & SWAR_HIGH;
    if (out) return j + ((size_t)__builtin_ctzll(out) >> 3);
    j += 8;
  }
  while (j < len && (unsigned)(s[j] | (unsigned)(fold & 0xFF)) - lo <= hi - lo) j++;
  return j;
}
#else
FAST_PATH size_t ascii_run(const unsigned char *s, size_t len, size_t j,
                           unsigned lo, unsigned hi, uint64_t fold) {
  while (j < len && (unsigned)(s[j] | (unsigned)(fold & 0xFF)) - lo <= hi - lo) j++;
  return j;
}
#endif
/* fold 0x20 in every byte: [A-Za-z] becomes [a-z] and no other byte does */
#define ASCII_LETTERS(s, len, j) ascii_run((s), (len), (j), 'a', 'z', 0x2020202020202020ull)
#define ASCII_UPPERS(s, len, j) ascii_run((s), (len), (j), 'A', 'Z', 0)
#define ASCII_LOWERS(s, len, j) ascii_run((s), (len), (j), 'a', 'z', 0)

/* End of [A-Z]*[a-z]* from j.  Both runs of most words lie within the
 * eight bytes at j: one load gives both masks, and the end is two
 * trailing-zero counts away, with no branch on the word's shape. */
FAST_PATH size_t ascii_upper_lower(const unsigned char *s, size_t len, size_t j) {
#ifdef SWAR_HIGH
  if (j + 8 <= len) {
    uint64_t v, not_up, not_low;
    memcpy(&v, s + j, 8);
    not_up = ~swar_in(v, 'A', 'Z') & SWAR_HIGH;
    if (not_up) {
      /* bytes from the first non-uppercase one on that are not lowercase */
      not_low = ~swar_in(v, 'a', 'z') & SWAR_HIGH & (~0ull << __builtin_ctzll(not_up));
      if (not_low) return j + ((size_t)__builtin_ctzll(not_low) >> 3);
      return ASCII_LOWERS(s, len, j + 8);
    }
  }
#endif
  return ASCII_LOWERS(s, len, ASCII_UPPERS(s, len, j));
}

/* \p{N}{1,3} at i (an ASCII digit). */
FAST_PATH size_t ascii_digits(const unsigned char *s, size_t len, size_t i) {
  size_t j = i + 1;
  while (j < len && j < i + 3 && A_DIGIT(s[j])) j++;
  if (j < i + 3 && j < len && s[j] >= 0x80) return 0; /* a non-ASCII digit? */
  return j;
}

/* [^\s\p{L}\p{N}]+ from j (an ASCII O byte), then [\r\n]* or [\r\n/]*. */
FAST_PATH size_t ascii_punct(const unsigned char *s, size_t len, size_t j, int slash) {
  while (j < len && s[j] < 0x80 && A_O(s[j])) j++;
  if (j < len && s[j] >= 0x80) return 0; /* a non-ASCII symbol? */
  while (j < len && (s[j] == '\r' || s[j] == '\n' || (slash && s[j] == '/'))) j++;
  return j;
}

/* space_run() over ASCII: i is an ASCII \s byte. */
FAST_PATH size_t ascii_space(const unsigned char *s, size_t len, size_t i) {
  size_t j = i, last = i, nl = 0;
  int have_nl = 0;
  while (j < len && s[j] < 0x80 && (A_FLAGS(s[j]) & UC_S)) {
    if (s[j] == '\r' || s[j] == '\n') { nl = j; have_nl = 1; }
    last = j++;
  }
  if (j < len && s[j] >= 0x80) return 0; /* a non-ASCII space? */
  if (have_nl) return nl + 1;
  if (j >= len) return j;
  if (last > i) return last;
  return j;
}

/* What every ASCII piece that is not a word becomes, for both encodings:
 * digits, an optionally space-led punctuation run, or a space run.  c is
 * s[i] (ASCII, not a letter); d is s[i + 1] (ASCII, not a letter). */
FAST_PATH size_t ascii_other(const unsigned char *s, size_t len, size_t i,
                             unsigned c, unsigned d, int slash) {
  if (A_DIGIT(c)) return ascii_digits(s, len, i);
  if (c == ' ' && i + 1 < len && A_O(d)) return ascii_punct(s, len, i + 1, slash);
  if (A_O(c)) return ascii_punct(s, len, i, slash);
  return ascii_space(s, len, i);
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
static size_t next_cl100k_general(const unsigned char *s, size_t len, size_t i) {
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

/* cl100k on ASCII (s[i] < 0x80): a contraction; a letter run with an
 * optional one-character prefix; else ascii_other().  0: not decided. */
FAST_PATH size_t cl100k_ascii(const unsigned char *s, size_t len, size_t i) {
  unsigned c = s[i], d = 0;
  size_t j = i + 1, e;
  if (c == '\'' && (e = contraction(s, len, i)) != 0) return i + e;
  if (!A_LETTER(c)) {
    if (j >= len) return 0; /* the last byte: rare, left to the general matcher */
    d = s[j];
    if (d >= 0x80) return 0;
    if (!A_LETTER(d) || A_DIGIT(c) || c == '\r' || c == '\n')
      return ascii_other(s, len, i, c, d, 0);
    j++; /* c is the prefix */
  }
  j = ASCII_LETTERS(s, len, j);
  if (j < len && s[j] >= 0x80) return 0; /* more letters? */
  return j;
}

static size_t next_cl100k(const unsigned char *s, size_t len, size_t i) {
  size_t e;
  if (s[i] < 0x80 && (e = cl100k_ascii(s, len, i)) != 0) return e;
  return next_cl100k_general(s, len, i);
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

/* o200k on ASCII (s[i] < 0x80): a word, optionally prefixed, is
 * [A-Z]*[a-z]* and an optional contraction (on ASCII that is exactly what
 * alternatives 1 and 2 match: an uppercase run followed by a lowercase run
 * is alternative 1, an uppercase run alone alternative 2); anything else is
 * ascii_other().  0: not decided. */
FAST_PATH size_t o200k_ascii(const unsigned char *s, size_t len, size_t i) {
  unsigned c = s[i], d = 0;
  size_t j = i;
  if (!A_LETTER(c)) {
    j = i + 1;
    if (j >= len) return 0; /* the last byte: rare, left to the general matcher */
    d = s[j];
    if (d >= 0x80) return 0;
    if (!A_LETTER(d) || A_DIGIT(c) || c == '\r' || c == '\n')
      return ascii_other(s, len, i, c, d, 1);
  }
  j = ascii_upper_lower(s, len, j);
  if (j < len && s[j] >= 0x80) return 0; /* more letters or marks? */
  return j + contraction(s, len, j);
}

static size_t next_o200k(const unsigned char *s, size_t len, size_t i) {
  size_t e;
  if (s[i] < 0x80 && (e = o200k_ascii(s, len, i)) != 0) return e;
  return next_o200k_general(s, len, i);
}

int slm_pretok_kind(const char *name) {
  if (strcmp(name, "cl100k") == 0) return SLM_PRETOK_CL100K;
  if (strcmp(name, "o200k") == 0) return SLM_PRETOK_O200K;
  if (strcmp(name, "o200k_general") == 0) return SLM_PRETOK_O200K_GENERAL;
  if (strcmp(name, "cl100k_general") == 0) return SLM_PRETOK_CL100K_GENERAL;
  if (strcmp(name, "llama3") == 0) return SLM_PRETOK_LLAMA3;
  return -1;
}

size_t slm_pretok_next(int kind, const unsigned char *s, size_t len, size_t pos) {
  if (kind == SLM_PRETOK_O200K) return next_o200k(s, len, pos);
  if (kind == SLM_PRETOK_O200K_GENERAL) return next_o200k_general(s, len, pos);
  if (kind == SLM_PRETOK_CL100K_GENERAL) return next_cl100k_general(s, len, pos);
  return next_cl100k(s, len, pos);
}

/* One loop per kind, with the ASCII fast path inlined into it and the
 * general matcher called when it does not decide. */
#define SPLIT_LOOP(fast, general)                                            \
  while (k < max && pos < len) {                                             \
    size_t e = s[pos] < 0x80 ? fast(s, len, pos) : 0;                        \
    pos = e ? e : general(s, len, pos);                                      \
    ends[k++] = pos;                                                         \
  }
#define NO_FAST(s, len, pos) 0

size_t slm_pretok_split(int kind, const unsigned char *s, size_t len, size_t pos,
                        size_t *ends, size_t max) {
  size_t k = 0;
  switch (kind) {
  case SLM_PRETOK_O200K: SPLIT_LOOP(o200k_ascii, next_o200k_general); break;
  case SLM_PRETOK_O200K_GENERAL: SPLIT_LOOP(NO_FAST, next_o200k_general); break;
  case SLM_PRETOK_CL100K_GENERAL: SPLIT_LOOP(NO_FAST, next_cl100k_general); break;
  default: SPLIT_LOOP(cl100k_ascii, next_cl100k_general); break;
  }
  return k;
}
