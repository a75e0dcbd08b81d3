#!/usr/bin/env bash
# One command for the tests: install into .venv (once), lint, then pytest. Arguments go to pytest
# (e.g. -m "slow and not training"); without any, the default suite runs (setup.cfg: not slow, not training).
# shellcheck source=scripts/venv.sh
source "$(dirname "$0")/venv.sh"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
exec "$PYTHON" -m pytest "$@"
