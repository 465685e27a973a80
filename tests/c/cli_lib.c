/* cli_lib: the library cli_target's "dl" mode loads (tests/test_cli.py copies it,
 * then deletes or replaces the copy while it is mapped). */
__attribute__((noipa)) int cli_lib_fn(int x)
{
    return 2 * x + 1;
}
