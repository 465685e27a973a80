/* Register preservation and handler-made changes across a nop5 site.
 *
 *   fast_regs check SEED N   run probe_regs N times (seeds SEED, SEED+1, ...) and check
 *                            that every register, rflags and xmm0 came through the site
 *                            unchanged; prints "check ok N", exits 1 on a mismatch.
 *   fast_regs modify SEED    one pass; prints the values of rax rcx r11 rbx after the site
 *                            and exits 1 if any other register changed.
 *   fast_regs jump           calls jump_func: 1 if it ran on after jump_site, 2 if it
 *                            continued at jump_target; prints "jump N".
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fast_regcheck.h"

int jump_func(void);
__asm__(
    ".text\n"
    ".globl jump_func\n"
    ".type jump_func, @function\n"
    "jump_func:\n"
    "    xor %eax, %eax\n"
    ".globl jump_site\n"
    "jump_site:\n"
    "    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
    "    mov $1, %eax\n"
    "    ret\n"
    ".globl jump_target\n"
    "jump_target:\n"
    "    mov $2, %eax\n"
    "    ret\n"
    ".size jump_func, .-jump_func\n");

int main(int argc, char **argv)
{
    uint64_t out[PROBE_OUT_WORDS];
    char msg[1024];
    if (argc >= 4 && strcmp(argv[1], "check") == 0) {
        uint64_t seed = strtoull(argv[2], NULL, 0);
        long n = strtol(argv[3], NULL, 0);
        for (long i = 0; i < n; i++) {
            memset(out, 0, sizeof out);
            probe_regs(seed + (uint64_t)i, out);
            if (check_regs(seed + (uint64_t)i, out, 0, msg, sizeof msg)) {
                printf("check FAILED at pass %ld:%s\n", i, msg);
                return 1;
            }
        }
        printf("check ok %ld\n", n);
        return 0;
    }
    if (argc >= 3 && strcmp(argv[1], "modify") == 0) {
        uint64_t seed = strtoull(argv[2], NULL, 0);
        memset(out, 0, sizeof out);
        probe_regs(seed, out);
        unsigned skip = 1u << R_RAX | 1u << R_RCX | 1u << R_R11 | 1u << R_RBX;
        int bad = check_regs(seed, out, skip, msg, sizeof msg);
        printf("rax=%#llx rcx=%#llx r11=%#llx rbx=%#llx\n", (unsigned long long)out[R_RAX],
               (unsigned long long)out[R_RCX], (unsigned long long)out[R_R11],
               (unsigned long long)out[R_RBX]);
        if (bad) {
            printf("modify FAILED:%s\n", msg);
            return 1;
        }
        return 0;
    }
    if (argc >= 2 && strcmp(argv[1], "jump") == 0) {
        printf("jump %d\n", jump_func());
        return 0;
    }
    fprintf(stderr, "usage: %s check SEED N | modify SEED | jump\n", argv[0]);
    return 2;
}
