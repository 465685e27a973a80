/* ptprobe_sdt.h - a small USDT header for ptprobe's tests (gcc/clang, x86-64 and
 * other ELF targets whose assembler is GNU as).
 *
 * Each probe site is a NOP in the code plus a note in the non-allocated section
 * .note.stapsdt (owner "stapsdt", type 3) whose descriptor is
 *
 *     location  (address-size word: address of the first byte of the site)
 *     base      (address-size word: address of the symbol _.stapsdt.base)
 *     semaphore (address-size word: address of a 16-bit counter, or 0)
 *     "provider\0" "name\0" "args\0"
 *
 * The args string is a space separated list of SIZE@OPERAND items, SIZE being
 * the byte size of the argument, negative when its type is signed, with an "f"
 * suffix (4f, 8f) for float/double.  The operands are printed by the compiler
 * from asm input operands (constraint PTPROBE_SDT_ARG_CONSTRAINT, "nri" unless
 * defined before including this header; "nor" also allows memory operands).
 *
 * Site forms, chosen by defining PTPROBE_SDT_NOP before including this header
 * (default PTPROBE_SDT_NOP_1), or per site with PTPROBE_SDT_PROBE_NOP():
 *
 *     PTPROBE_SDT_NOP_1      90                                 (1 byte)
 *     PTPROBE_SDT_NOP_5      0f 1f 44 00 00                     (5 bytes)
 *     PTPROBE_SDT_NOP_1_5    90 0f 1f 44 00 00                  (6 bytes)
 *     PTPROBE_SDT_NOP_1_10   90 66 2e 0f 1f 84 00 00 00 00 00   (11 bytes)
 *
 * The note's location is always the first byte of the site.
 *
 * Usage:
 *     PTPROBE_SDT_PROBE(provider, name, arg...)          0 to 12 arguments
 *     PTPROBE_SDT_PROBE_NOP(form, provider, name, arg...)
 *     PTPROBE_SDT_SEMAPHORE(provider, name);             at file scope, once
 *     PTPROBE_SDT_PROBE_SEM(provider, name, arg...)      note records the semaphore
 *     PTPROBE_SDT_PROBE_SEM_NOP(form, provider, name, arg...)
 *     PTPROBE_SDT_ENABLED(provider, name)                nonzero while a tracer counts it
 *
 * Arguments must be integers, enums, pointers, float or double (long double
 * and aggregates are not supported). With the default "nri" constraint a
 * float/double travels in a general register ("8f@%rax": the register holds
 * its bits); "nor" lets the compiler name its memory location instead.
 * Needs GNU C (named asm operands, ", ##__VA_ARGS__", __builtin_choose_expr).
 */
#ifndef PTPROBE_SDT_H
#define PTPROBE_SDT_H

#if !defined(__GNUC__) || defined(__STRICT_ANSI__) || defined(__cplusplus)
#error "ptprobe_sdt.h needs GNU C (gcc or clang, -std=gnu99 or later; not C++)"
#endif

#define PTPROBE_SDT_NOP_1    "nop"
#define PTPROBE_SDT_NOP_5    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00"
#define PTPROBE_SDT_NOP_1_5  ".byte 0x90, 0x0f, 0x1f, 0x44, 0x00, 0x00"
#define PTPROBE_SDT_NOP_1_10 ".byte 0x90, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00"

#ifndef PTPROBE_SDT_NOP
#define PTPROBE_SDT_NOP PTPROBE_SDT_NOP_1
#endif

#ifndef PTPROBE_SDT_ARG_CONSTRAINT
#define PTPROBE_SDT_ARG_CONSTRAINT "nri"
#endif

#if defined(__LP64__) || defined(_LP64)
#define _PTPROBE_SDT_WORD ".8byte"
#else
#define _PTPROBE_SDT_WORD ".4byte"
#endif

#define _PTPROBE_SDT_STR(x) #x
#define _PTPROBE_SDT_XSTR(x) _PTPROBE_SDT_STR(x)
#define _PTPROBE_SDT_CAT(a, b) _PTPROBE_SDT_CAT_(a, b)
#define _PTPROBE_SDT_CAT_(a, b) a##b

/* ---- argument description ------------------------------------------------ */

/* __builtin_classify_type: 1 integer, 2 char, 3 enum, 4 bool, 5 pointer,
 * 8 real (float/double), 14 array (decays, reported as 5 in C). */
#define _PTPROBE_SDT_CLASS(x) __builtin_classify_type(x)
#define _PTPROBE_SDT_IS_INT(x) (_PTPROBE_SDT_CLASS(x) >= 1 && _PTPROBE_SDT_CLASS(x) <= 4)
#define _PTPROBE_SDT_IS_FLOAT(x) (_PTPROBE_SDT_CLASS(x) == 8)
#define _PTPROBE_SDT_IS_PTR(x) (_PTPROBE_SDT_CLASS(x) == 5 || _PTPROBE_SDT_CLASS(x) == 14)
/* An integer type to test signedness on: the argument's own type when it is
 * an integer, unsigned int otherwise (pointers are unsigned). */
#define _PTPROBE_SDT_ITYPE(x) \
    __typeof__(__builtin_choose_expr(_PTPROBE_SDT_IS_INT(x), (x), 0U))
#define _PTPROBE_SDT_SIGNED(x) \
    ((_PTPROBE_SDT_ITYPE(x))-1 < (_PTPROBE_SDT_ITYPE(x))1)
#define _PTPROBE_SDT_BYTES(x) \
    ((int)(_PTPROBE_SDT_IS_PTR(x) ? sizeof(void *) : sizeof(x)))
/* The size code: -N signed integer, N unsigned integer or pointer,
 * 100+N floating point (printed as "Nf" by the template below). */
#define _PTPROBE_SDT_SIZE(x)                                                   \
    (_PTPROBE_SDT_IS_FLOAT(x) ? 100 + _PTPROBE_SDT_BYTES(x)                    \
     : _PTPROBE_SDT_SIGNED(x) ? -_PTPROBE_SDT_BYTES(x) : _PTPROBE_SDT_BYTES(x))

/* Template text for argument i: the size code (via .if so that floats print
 * "4f"/"8f"), "@", then the operand as the compiler prints it. */
#define _PTPROBE_SDT_FMT_ARG(i)                                                \
    "\t.if %c[_ps" #i "] == 104\n"                                             \
    "\t.ascii \"4f\"\n"                                                        \
    "\t.elseif %c[_ps" #i "] == 108\n"                                         \
    "\t.ascii \"8f\"\n"                                                        \
    "\t.else\n"                                                                \
    "\t.ascii \"%c[_ps" #i "]\"\n"                                             \
    "\t.endif\n"                                                               \
    "\t.ascii \"@%[_pa" #i "]\"\n"
#define _PTPROBE_SDT_FMT_SEP "\t.ascii \" \"\n"

#define _PTPROBE_SDT_OP(i, x)                                                  \
    [_ps##i] "n" (_PTPROBE_SDT_SIZE(x)), [_pa##i] PTPROBE_SDT_ARG_CONSTRAINT (x)

#define _PTPROBE_SDT_FMT0 ""
#define _PTPROBE_SDT_FMT1 _PTPROBE_SDT_FMT_ARG(1)
#define _PTPROBE_SDT_FMT2 _PTPROBE_SDT_FMT1 _PTPROBE_SDT_FMT_SEP _PTPROBE_SDT_FMT_ARG(2)
#define _PTPROBE_SDT_FMT3 _PTPROBE_SDT_FMT2 _PTPROBE_SDT_FMT_SEP _PTPROBE_SDT_FMT_ARG(3)
#define _PTPROBE_SDT_FMT4 _PTPROBE_SDT_FMT3 _PTPROBE_SDT_FMT_SEP _PTPROBE_SDT_FMT_ARG(4)
#define _PTPROBE_SDT_FMT5 _PTPROBE_SDT_FMT4 _PTPROBE_SDT_FMT_SEP _PTPROBE_SDT_FMT_ARG(5)
#define _PTPROBE_SDT_FMT6 _PTPROBE_SDT_FMT5 _PTPROBE_SDT_FMT_SEP _PTPROBE_SDT_FMT_ARG(6)
#define _PTPROBE_SDT_FMT7 _PTPROBE_SDT_FMT6 _PTPROBE_SDT_FMT_SEP _PTPROBE_SDT_FMT_ARG(7)
#define _PTPROBE_SDT_FMT8 _PTPROBE_SDT_FMT7 _PTPROBE_SDT_FMT_SEP _PTPROBE_SDT_FMT_ARG(8)
#define _PTPROBE_SDT_FMT9 _PTPROBE_SDT_FMT8 _PTPROBE_SDT_FMT_SEP _PTPROBE_SDT_FMT_ARG(9)
#define _PTPROBE_SDT_FMT10 _PTPROBE_SDT_FMT9 _PTPROBE_SDT_FMT_SEP _PTPROBE_SDT_FMT_ARG(10)
#define _PTPROBE_SDT_FMT11 _PTPROBE_SDT_FMT10 _PTPROBE_SDT_FMT_SEP _PTPROBE_SDT_FMT_ARG(11)
#define _PTPROBE_SDT_FMT12 _PTPROBE_SDT_FMT11 _PTPROBE_SDT_FMT_SEP _PTPROBE_SDT_FMT_ARG(12)

#define _PTPROBE_SDT_OPS0()
#define _PTPROBE_SDT_OPS1(a) _PTPROBE_SDT_OP(1, a)
#define _PTPROBE_SDT_OPS2(a, b) _PTPROBE_SDT_OPS1(a), _PTPROBE_SDT_OP(2, b)
#define _PTPROBE_SDT_OPS3(a, b, c) _PTPROBE_SDT_OPS2(a, b), _PTPROBE_SDT_OP(3, c)
#define _PTPROBE_SDT_OPS4(a, b, c, d) _PTPROBE_SDT_OPS3(a, b, c), _PTPROBE_SDT_OP(4, d)
#define _PTPROBE_SDT_OPS5(a, b, c, d, e) \
    _PTPROBE_SDT_OPS4(a, b, c, d), _PTPROBE_SDT_OP(5, e)
#define _PTPROBE_SDT_OPS6(a, b, c, d, e, f) \
    _PTPROBE_SDT_OPS5(a, b, c, d, e), _PTPROBE_SDT_OP(6, f)
#define _PTPROBE_SDT_OPS7(a, b, c, d, e, f, g) \
    _PTPROBE_SDT_OPS6(a, b, c, d, e, f), _PTPROBE_SDT_OP(7, g)
#define _PTPROBE_SDT_OPS8(a, b, c, d, e, f, g, h) \
    _PTPROBE_SDT_OPS7(a, b, c, d, e, f, g), _PTPROBE_SDT_OP(8, h)
#define _PTPROBE_SDT_OPS9(a, b, c, d, e, f, g, h, i) \
    _PTPROBE_SDT_OPS8(a, b, c, d, e, f, g, h), _PTPROBE_SDT_OP(9, i)
#define _PTPROBE_SDT_OPS10(a, b, c, d, e, f, g, h, i, j) \
    _PTPROBE_SDT_OPS9(a, b, c, d, e, f, g, h, i), _PTPROBE_SDT_OP(10, j)
#define _PTPROBE_SDT_OPS11(a, b, c, d, e, f, g, h, i, j, k) \
    _PTPROBE_SDT_OPS10(a, b, c, d, e, f, g, h, i, j), _PTPROBE_SDT_OP(11, k)
#define _PTPROBE_SDT_OPS12(a, b, c, d, e, f, g, h, i, j, k, l) \
    _PTPROBE_SDT_OPS11(a, b, c, d, e, f, g, h, i, j, k), _PTPROBE_SDT_OP(12, l)

/* Number of variadic arguments, 0..12 (GNU ", ##__VA_ARGS__"). */
#define _PTPROBE_SDT_NARGS(...) \
    _PTPROBE_SDT_NARGS_(_, ##__VA_ARGS__, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)
#define _PTPROBE_SDT_NARGS_(_0, _1, _2, _3, _4, _5, _6, _7, _8, _9, _10, _11, _12, n, ...) n

/* ---- the note ----------------------------------------------------------- */

/* One hidden weak byte in a COMDAT section, defined once per object file; its
 * address in each note lets a reader detect that sections moved after linking. */
#define _PTPROBE_SDT_BASE                                                      \
    ".ifndef _.stapsdt.base\n"                                                 \
    "\t.pushsection .stapsdt.base, \"aG\", @progbits, .stapsdt.base, comdat\n" \
    "\t.weak _.stapsdt.base\n"                                                 \
    "\t.hidden _.stapsdt.base\n"                                               \
    "_.stapsdt.base:\n"                                                        \
    "\t.space 1\n"                                                             \
    "\t.size _.stapsdt.base, 1\n"                                              \
    "\t.popsection\n"                                                          \
    ".endif\n"

#define _PTPROBE_SDT_ASM(nop, provider, name, semaphore, fmt)                  \
    "770:\t" nop "\n"                                                          \
    "\t.pushsection .note.stapsdt, \"?\", @note\n"                             \
    "\t.balign 4\n"                                                            \
    "\t.4byte 772f - 771f, 774f - 773f, 3\n"                                   \
    "771:\t.asciz \"stapsdt\"\n"                                               \
    "772:\t.balign 4\n"                                                        \
    "773:\t" _PTPROBE_SDT_WORD " 770b\n"                                       \
    "\t" _PTPROBE_SDT_WORD " _.stapsdt.base\n"                                 \
    "\t" _PTPROBE_SDT_WORD " " semaphore "\n"                                  \
    "\t.asciz \"" #provider "\"\n"                                             \
    "\t.asciz \"" #name "\"\n"                                                 \
    fmt                                                                        \
    "\t.byte 0\n"                                                              \
    "774:\t.balign 4\n"                                                        \
    "\t.popsection\n"                                                          \
    _PTPROBE_SDT_BASE

#define _PTPROBE_SDT_SITE(nop, provider, name, semaphore, n, ...)              \
    __asm__ __volatile__(                                                      \
        _PTPROBE_SDT_ASM(nop, provider, name, semaphore,                       \
                         _PTPROBE_SDT_CAT(_PTPROBE_SDT_FMT, n))                \
        : : _PTPROBE_SDT_CAT(_PTPROBE_SDT_OPS, n)(__VA_ARGS__))

#define _PTPROBE_SDT_SEMNAME(provider, name) provider##_##name##_semaphore

/* ---- public macros ------------------------------------------------------ */

#define PTPROBE_SDT_PROBE_NOP(nop, provider, name, ...)                        \
    _PTPROBE_SDT_SITE(nop, provider, name, "0",                                \
                      _PTPROBE_SDT_NARGS(__VA_ARGS__), ##__VA_ARGS__)

#define PTPROBE_SDT_PROBE(provider, name, ...)                                 \
    PTPROBE_SDT_PROBE_NOP(PTPROBE_SDT_NOP, provider, name, ##__VA_ARGS__)

#define PTPROBE_SDT_SEMAPHORE(provider, name)                                  \
    __extension__ unsigned short _PTPROBE_SDT_SEMNAME(provider, name)          \
        __attribute__((used, section(".probes")))

#define PTPROBE_SDT_PROBE_SEM_NOP(nop, provider, name, ...)                    \
    _PTPROBE_SDT_SITE(nop, provider, name,                                     \
                      _PTPROBE_SDT_XSTR(_PTPROBE_SDT_SEMNAME(provider, name)), \
                      _PTPROBE_SDT_NARGS(__VA_ARGS__), ##__VA_ARGS__)

#define PTPROBE_SDT_PROBE_SEM(provider, name, ...)                             \
    PTPROBE_SDT_PROBE_SEM_NOP(PTPROBE_SDT_NOP, provider, name, ##__VA_ARGS__)

#define PTPROBE_SDT_ENABLED(provider, name)                                    \
    __builtin_expect(*(volatile unsigned short *)&_PTPROBE_SDT_SEMNAME(provider, name) != 0, 0)

#endif /* PTPROBE_SDT_H */
