# Shared by scripts/*: create .venv and install the project into it, once per
# change of pyproject.toml. Usage: source scripts/_venv.sh; ensure_venv EXTRAS
VENV=${BEMI_VENV:-.venv}

ensure_venv() {
    local extras=$1
    local python=${PYTHON:-python3}
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "error: Python 3.10+ is needed (found: $("$python" --version 2>&1)). Set PYTHON=/path/to/python3.x" >&2
        exit 1
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> Creating a virtual environment in $VENV"
        "$python" -m venv "$VENV"
    fi
    local stamp="$VENV/.bemi-installed-$extras"
    local digest
    digest=$(cat pyproject.toml | sha256sum | cut -c1-16)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
        echo "==> Installing bemi-django-selfhosted[$extras] (this checkout, editable) into $VENV"
        # The published bemi-django (or this project under that old name) ships the same
        # import package `bemi`: take it out first so that only this checkout provides it.
        if "$VENV/bin/python" -m pip show -q bemi-django >/dev/null 2>&1; then
            "$VENV/bin/python" -m pip uninstall -q -y --disable-pip-version-check bemi-django
        fi
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]"
        echo "$digest" > "$stamp"
    fi
}
