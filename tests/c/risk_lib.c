/* risk_lib.c - built twice, with -DINC=1 and -DINC=2: two libraries of the same
 * layout whose value() differs in its first instruction (lea eax, [rdi+INC]). */
int value(int x)
{
    return x + INC;
}
