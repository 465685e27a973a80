/* See fast_regcheck.c. */
#ifndef FAST_REGCHECK_H
#define FAST_REGCHECK_H
#include <stddef.h>
#include <stdint.h>

#define PROBE_OUT_WORDS 20
enum { R_RAX, R_RBX, R_RCX, R_RDX, R_RSI, R_RDI, R_RBP, R_RSP,
       R_R8, R_R9, R_R10, R_R11, R_R12, R_R13, R_R14, R_R15 };

extern const char *const REG_NAMES[16];
extern const uint64_t probe_k[16];
void probe_regs(uint64_t seed, uint64_t *out);
uint64_t expected_reg(uint64_t seed, int i);
uint64_t expected_flags(uint64_t seed);
int check_regs(uint64_t seed, const uint64_t *out, unsigned skip, char *msg, size_t size);
#endif
