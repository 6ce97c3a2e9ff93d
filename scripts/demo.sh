#!/usr/bin/env bash
# The main job on a fresh machine: set-up (as scripts/test.sh does), then `abs-fast demo`: ABS self-play
# on the built-in tiny model with the heuristic judge, on CPU, in a few minutes. Arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
. scripts/setup.sh
abs-fast demo "$@"
