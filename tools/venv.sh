# Sourced by tools/demo.sh and tools/test.sh: the project's virtual environment.
#
# .venv in the repository (git-ignored), created on first use with the python3 on PATH
# (PYTHON=... to choose another), holding ptprobe's dependencies from setup.cfg (and with
# "test", its test dependencies); installed again when setup.cfg's lists change. ptprobe
# itself runs from the checkout (PYTHONPATH), so nothing is built in the tree: no
# egg-info, no build/, and no __pycache__ (PYTHONDONTWRITEBYTECODE). Works with a Python
# that is "externally managed" (PEP 668, Debian 12): nothing is installed into it. Where
# the venv module has no pip (Debian's python3-venv not installed), the venv is made
# without pip and filled by the system's pip (python3-pip) through --python.
#
# Sets PTPROBE_PYTHON to the environment's interpreter.

ptprobe_venv() {
    local extra="${1:-}" root venv python requirements stamp
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    venv="$root/.venv"
    python="${PYTHON:-python3}"
    requirements="$("$python" - "$root/setup.cfg" "$extra" <<'PY'
import configparser, sys
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
wanted = cfg["options"]["install_requires"].split("\n")
if sys.argv[2]:
    wanted += cfg["options.extras_require"][sys.argv[2]].split("\n")
print(" ".join(w.strip() for w in wanted if w.strip()))
PY
)" || return 1
    if [ ! -x "$venv/bin/python" ]; then
        echo "ptprobe: creating $venv" >&2
        if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
            rm -rf "$venv"
            "$python" -m venv --without-pip "$venv" || return 1
        fi
    fi
    stamp="$venv/ptprobe-requirements.txt"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$requirements" ]; then
        echo "ptprobe: installing into $venv: $requirements" >&2
        # shellcheck disable=SC2086  # one word per requirement
        if "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
            "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $requirements || return 1
        elif "$python" -m pip --version >/dev/null 2>&1; then
            "$python" -m pip --python "$venv/bin/python" install --quiet --disable-pip-version-check \
                $requirements || return 1
        else
            echo "ptprobe: no pip to install with: install python3-venv or python3-pip" >&2
            return 1
        fi
        printf '%s\n' "$requirements" > "$stamp"
    fi
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONDONTWRITEBYTECODE=1
    PTPROBE_PYTHON="$venv/bin/python"
}
