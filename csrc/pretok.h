/*
 * pretok.h - pre-tokenizers: split text into the pieces that BPE encodes
 * one at a time, exactly as each encoding's split regex would, written by
 * hand over the generated Unicode class table (no regex engine).
 */
#ifndef SLM_PRETOK_H
#define SLM_PRETOK_H

#include <stddef.h>
#include <stdint.h>

enum {
  SLM_PRETOK_CL100K = 0, /* cl100k_base (and Llama 3: same split, see pretok.c) */
  SLM_PRETOK_O200K = 1,  /* o200k_base */
  SLM_PRETOK_LLAMA3 = 2, /* Llama 3 tokenizer.py / tokenizer.json pattern */
  SLM_PRETOK_O200K_GENERAL = 3, /* o200k without its ASCII fast path (tests) */
  SLM_PRETOK_CL100K_GENERAL = 4 /* cl100k without its ASCII fast path (tests) */
};

/* Kind from its name ("cl100k", "o200k", "llama3"; "o200k_general" and
 * "cl100k_general" for the tests); -1 when unknown. */
int slm_pretok_kind(const char *name);

/* End offset (> pos) of the piece that starts at pos in s[0, len), pos < len.
 * Any byte sequence is accepted: a byte that does not start a well-formed
 * UTF-8 sequence is a character of its own, of no Unicode class. */
size_t slm_pretok_next(int kind, const unsigned char *s, size_t len, size_t pos);

/* The ends of the next pieces from pos (at most max of them, fewer only at
 * the end of the input) into ends[]; returns how many (0 when pos >= len).
 * Same pieces as calling slm_pretok_next repeatedly, without a call each. */
size_t slm_pretok_split(int kind, const unsigned char *s, size_t len, size_t pos,
                        size_t *ends, size_t max);

/* Length of the character at pos (1..4) in our reading of UTF-8 (strict:
 * no overlong forms, no surrogates, nothing above U+10FFFF); pos < len. */
size_t slm_utf8_len(const unsigned char *s, size_t len, size_t pos);

/* Largest character boundary <= pos (0 <= pos <= len). */
size_t slm_utf8_floor(const unsigned char *s, size_t len, size_t pos);

#endif
