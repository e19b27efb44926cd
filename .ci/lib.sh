# Shared by the CI scripts: fresh environments and the README's commands run as written.
# Every environment is built from nothing on every run (pip's download cache is reused, no
# installed environment is), so the newest packages the extras allow are what CI tests.

CI_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# fresh_venv DIR: a new virtual environment at DIR (anything there is removed first).
fresh_venv() {
    rm -rf "$1"
    python3 -m venv "$1"
    "$1/bin/python" -m pip install --quiet --upgrade pip
}

# run_readme VENV KEY: the README command line containing KEY, run in VENV from the root.
run_readme() {
    local cmd
    cmd="$(python3 "$CI_ROOT/.ci/readme_command.py" "$2")"
    echo "+ (venv $(basename "$1")) $cmd"
    (
        # shellcheck disable=SC1091
        source "$1/bin/activate"
        cd "$CI_ROOT"
        eval "$cmd"
    )
}
