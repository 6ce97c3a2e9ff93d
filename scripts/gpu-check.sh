#!/usr/bin/env bash
# Every GPU claim of abs-fast verified in one command, on a bare GPU machine with no network:
#   1. the wheels of DIR (made by scripts/gpu-wheels.sh) installed into a private target directory,
#      with no index (pip never reaches a network);
#   2. abs-fast copied into that directory and its native libraries built there with cmake (for
#      this GPU's architecture only), or a line saying why not;
#   3. bench/gpu_check.py: seven stages, compiles first, then most-valuable first, each in its own
#      process group with its own time limit under one deadline, writing OUT_DIR/gpu-check.json and
#      OUT_DIR/gpu-check.md as it goes (at most 470 s of stages; with install and build within 9 minutes).
# --smoke: tiny shapes on any machine (CPU in CI) in under 3 minutes, so this never rots.
#
#     bash scripts/gpu-check.sh [--wheels DIR] [--smoke] OUT_DIR
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
usage="usage: bash scripts/gpu-check.sh [--wheels DIR] [--smoke] [--install-only] OUT_DIR"
wheels="" smoke="" install_only="" out=""
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }; wheels=$2; shift 2 ;;
    --smoke) smoke=--smoke; shift ;;
    --install-only) install_only=1; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) echo "unknown option $1; $usage" >&2; exit 2 ;;
    *) [ -z "$out" ] || { echo "$usage" >&2; exit 2; }; out=$1; shift ;;
  esac
done
[ -n "$out" ] || { echo "$usage" >&2; exit 2; }
if [ -n "$wheels" ] && ! ls "$wheels"/*.whl >/dev/null 2>&1; then
  echo "--wheels $wheels: no *.whl there (make them with: bash scripts/gpu-wheels.sh $wheels)" >&2
  exit 2
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/abs-fast-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
site=$work/site
mkdir -p "$site"

if [ -n "$wheels" ]; then
  echo "== installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into a private directory (no index)"
  set -x
  "$python" -m pip install --quiet --isolated --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$wheels"/*.whl
  { set +x; } 2>/dev/null
fi

echo "== abs-fast from $repo (the source tree as it is) and its native libraries"
cp -r "$repo/abs_fast" "$site/abs_fast"
cp -r "$repo/kernels" "$site/abs_fast/kernels"  # what the wheel does (pyproject.toml: wheel.packages)
find "$site/abs_fast" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$site/abs_fast/_native"
native_note=""
if ! command -v cmake >/dev/null 2>&1; then
  native_note="native libraries not built: cmake is not installed"
else
  cmake_args=(-DCMAKE_BUILD_TYPE=Release "-DCMAKE_INSTALL_PREFIX=$site")
  command -v ninja >/dev/null 2>&1 && cmake_args+=(-G Ninja)
  if [ -z "$smoke" ] && command -v nvidia-smi >/dev/null 2>&1; then
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
    [ -n "$cap" ] && cmake_args+=("-DABS_FAST_CUDA_ARCHITECTURES=${cap}-real")  # this GPU only: a faster build
  else
    cmake_args+=(-DABS_FAST_CUDA=OFF)
  fi
  if cmake -S "$repo" -B "$work/build" "${cmake_args[@]}" >"$work/cmake.log" 2>&1 \
      && cmake --build "$work/build" >>"$work/cmake.log" 2>&1 && cmake --install "$work/build" >>"$work/cmake.log" 2>&1; then
    native_note="native libraries built: $(cd "$site/abs_fast/_native" 2>/dev/null && ls | tr '\n' ' ')"
  else
    native_note="native libraries not built: $(grep -m1 -i -E 'error|fatal' "$work/cmake.log" || tail -1 "$work/cmake.log")"
    cp "$work/cmake.log" "$out/native-build.log"
  fi
fi
echo "   $native_note"
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} ABS_FAST_NATIVE_NOTE=$native_note
export ABS_FAST_COMMIT=${ABS_FAST_COMMIT:-$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)}
unset TRITON_INTERPRET  # benchmarks measure real kernels
if [ -n "$install_only" ]; then
  cd "$out" && "$python" -c "import abs_fast, sys; print('abs_fast from', abs_fast.__file__)"
  exit 0
fi
# from OUT_DIR, so the source tree's abs_fast/ (without kernels) never shadows the installed copy
cd "$out"
exec "$python" "$repo/bench/gpu_check.py" "$out" $smoke
