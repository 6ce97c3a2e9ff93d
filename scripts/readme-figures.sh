#!/usr/bin/env bash
# Measures the demo figures the README quotes (times with an empty and a warm cache, the range of the
# headline metrics over seeds, disk use) and prints them as markdown with the machine and its load.
# Usage: bash scripts/readme-figures.sh [SEED ...]   (default: 0 1 2; about 2-3 minutes a seed on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
. scripts/setup.sh >&2  # its progress lines stay out of the markdown
python scripts/readme_figures.py "$@"
