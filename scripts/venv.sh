# Sourced by scripts/quickstart.sh and scripts/test.sh: make the virtualenv and install the package into it once.
#
#   VENV        the virtualenv directory (default .venv; .ci/run uses .ci-venv)
#   TORCH_SPEC  the torch requirement pip installs first (default torch==2.13.0, the CPU build the project is tested
#               with; give e.g. TORCH_SPEC=torch to take the build pip offers for this machine's hardware)
#
# The install is redone when pyproject.toml is newer than the last install, so a changed dependency is picked up.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating the virtualenv $VENV"
    python3 -m venv "$VENV"
fi
if [ ! -f "$VENV/.installed" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
    echo "[setup] installing baldro-lightning and $TORCH_SPEC into $VENV (a few minutes the first time)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC" -e ".[dev]"
    touch "$VENV/.installed"
fi
PYTHON="$VENV/bin/python"
