#!/usr/bin/env bash
# One command on a fresh machine: install into .venv (once), then run the offline quickstart.
# Arguments go to `python -m baldro_lightning quickstart` (e.g. --run_dir runs/embedded/my_run).
# shellcheck source=scripts/venv.sh
source "$(dirname "$0")/venv.sh"
exec "$PYTHON" -m baldro_lightning quickstart "$@"
