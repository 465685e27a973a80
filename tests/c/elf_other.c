/* Second unit of tests/c/elf_target.c: a global *object* named like the
 * static function helper() there (a lookup by name must prefer the function). */
int helper[4] = {1, 2, 3, 4};

int *other_get(void)
{
    return helper;
}
