#!/usr/bin/env bash
# The pinned SGLang for the contract tests, without its GPU dependencies: every package of
# tests/sglang_contract/requirements-VERSION.txt installed with --no-deps into a private directory
# (default .sglang-contract/VERSION, git-ignored), never into the project's environment.
# Usage: bash scripts/sglang-contract-env.sh [VERSION] [DIR]. Does nothing when DIR is up to date.
# The tests find DIR themselves; elsewhere, set ABS_FAST_SGLANG_CONTRACT_DIR=DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-0.5.23}"
requirements="tests/sglang_contract/requirements-$version.txt"
target="${2:-.sglang-contract/$version}"
[ -f "$requirements" ] || { echo "no $requirements: pinned versions are $(ls tests/sglang_contract | sed -n 's/requirements-\(.*\)\.txt/\1/p' | tr '\n' ' ')" >&2; exit 2; }
stamp="$target/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "== SGLang $version contract environment: up to date in $target"
  exit 0
fi
if [ -e "$target" ] && [ ! -f "$stamp" ]; then
  echo "$target exists and is not a contract environment this script made: choose another DIR" >&2
  exit 2
fi
echo "== SGLang $version contract environment: installing into $target (no dependencies, no GPU packages)"
if [ -e "$target.partial" ] && [ ! -f "$target.partial/.abs-fast-partial" ]; then
  echo "$target.partial exists and is not ours: remove it or choose another DIR" >&2
  exit 2
fi
rm -rf "$target.partial"
mkdir -p "$target.partial" && touch "$target.partial/.abs-fast-partial"
python -m pip install -q --disable-pip-version-check --no-deps --no-compile --target "$target.partial" -r "$requirements"
rm "$target.partial/.abs-fast-partial"
echo "$want" > "$target.partial/.requirements.sha256"
rm -rf "$target"
mv "$target.partial" "$target"
echo "   $(du -sh "$target" | cut -f1) in $target"
