#!/usr/bin/env bash
# The main job: set up (first run only), then run the demo on the embedded default data.
# Extra arguments go to `conformalseg demo` (e.g. --force to replace demo_out/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/conformalseg demo --out demo_out "$@"
