/* Second unit of tests/c/elf_target.c: a static *object* named like the
 * static function helper() there. */
static int helper[4] = {1, 2, 3, 4};

int *other_get(void)
{
    return helper;
}
