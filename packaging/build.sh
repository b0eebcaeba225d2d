#!/usr/bin/env bash
# Build the one-folder desktop bundle dist/pivotmerge-studio/ with PyInstaller.
#
# Usage: packaging/build.sh            (uses the active venv's python, or $PYTHON)
#        SMOKE=0 packaging/build.sh    (skip the offscreen start-up check)
#
# The bundle holds its own Python, torch (CPU or whatever build is installed), Qt and
# the demo kit: run it from the folder or link it into PATH. Start it as
# `pivotmerge-studio` for the app, or through the `pivotmerge` link for the CLI.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ]; then
  py="$VIRTUAL_ENV/bin/python"
else
  py="$(command -v python3)"
fi
echo "+ python: $py"

if ! "$py" -m PyInstaller --version >/dev/null 2>&1; then
  echo "+ installing pyinstaller into $("$py" -c 'import sys; print(sys.prefix)')"
  "$py" -m pip install "pyinstaller>=6.10"
fi
echo "+ pyinstaller $("$py" -m PyInstaller --version)"

if [ ! -d pivotmerge_gui/demo/artifacts ]; then
  echo "demo artifacts are missing; build them first: $py -m pivotmerge_gui.demo.build" >&2
  exit 1
fi
QT_QPA_PLATFORM=offscreen "$py" packaging/make_icons.py --check

start=$(date +%s)
"$py" -m PyInstaller --noconfirm --clean \
  --distpath dist --workpath build/pyinstaller \
  packaging/pivotmerge-studio.spec
bundle=dist/pivotmerge-studio
ln -sfn pivotmerge-studio "$bundle/pivotmerge"
echo "+ built $bundle in $(( $(date +%s) - start )) s, size $(du -sh "$bundle" | cut -f1)"

if [ "${SMOKE:-1}" = "1" ]; then
  shot=build/pyinstaller/smoke.png
  rm -f "$shot"
  "$bundle/pivotmerge" methods >/dev/null
  QT_QPA_PLATFORM=offscreen "$bundle/pivotmerge-studio" --demo --screenshot "$shot"
  test -s "$shot"
  echo "+ smoke test passed: CLI runs, app saved $shot"
fi
