#!/usr/bin/env bash
# Release check of the wheel: build it, install it into a brand-new venv, run it there.
#
# Usage: packaging/check_wheel.sh [WORKDIR]     (default: a new folder under /tmp)
#   PYTHON=python3.11 packaging/check_wheel.sh   (interpreter for the build and the venv)
#   TORCH_SPEC="torch==2.13.0"                   (torch to install first; the CPU pin by default)
#
# Checks, in order: the wheel holds the resources and every demo artifact; the installed
# `pivotmerge methods` lists methods; `pivotmerge inspect` reads a demo expert that came
# from the installed package (not the source tree); the installed app saves a screenshot
# of the demo session offscreen; the icon resolves inside site-packages.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
work="${1:-$(mktemp -d /tmp/pivotmerge-wheel.XXXXXX)}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1
step() { echo; echo "== $*"; }
# pip repeats one line per package about local index folders this machine lacks: hide them.
quiet_pip() { "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }; }

if [ ! -f "$repo/pivotmerge_gui/demo/artifacts/manifest.json" ]; then
  echo "demo artifacts are missing; build them first: $py -m pivotmerge_gui.demo.build" >&2
  exit 1
fi

step "build the wheel"
# From a copy of the source files: an in-tree build leaves build/lib behind, and a stale
# build/lib would smuggle deleted modules into later wheels.
rm -rf "$work/wheel" "$work/src"
mkdir -p "$work/src"
if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
  git -C "$repo" ls-files -z --cached --others --exclude-standard \
    | (cd "$repo" && tar --null --ignore-failed-read -cf - -T -) | tar -xf - -C "$work/src"
else
  (cd "$repo" && tar --exclude=.git --exclude=build --exclude=dist --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.venv -cf - .) | tar -xf - -C "$work/src"
fi
quiet_pip "$py" -m pip wheel "$work/src" -w "$work/wheel" --no-deps -q
wheel="$(ls "$work"/wheel/pivotmerge_gui-*.whl)"
echo "$wheel ($(du -h "$wheel" | cut -f1))"

step "check the wheel's contents"
"$py" - "$wheel" "$repo" <<'EOF'
import sys, zipfile
from pathlib import Path
wheel, repo = sys.argv[1], Path(sys.argv[2])
names = set(zipfile.ZipFile(wheel).namelist())
want = [f"pivotmerge_gui/resources/{p.relative_to(repo / 'resources').as_posix()}"
        for p in (repo / "resources").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
want += [p.relative_to(repo).as_posix()
         for p in (repo / "pivotmerge_gui/demo/artifacts").rglob("*") if p.is_file()]
missing = [n for n in want if n not in names]
if missing:
    sys.exit("missing from the wheel:\n  " + "\n  ".join(missing))
print(f"ok: {len(want)} resource and demo files present, {len(names)} entries in all")
EOF

step "fresh venv: $torch_spec + the wheel"
rm -rf "$work/venv"
"$py" -m venv "$work/venv"
bin="$work/venv/bin"
quiet_pip "$bin/pip" install -q "$torch_spec"
quiet_pip "$bin/pip" install -q "$wheel"

cd "$work"  # away from the source tree, so only the installed package can be imported
step "installed package location"
"$bin/python" - <<'EOF'
import pivotmerge_gui, sys
from pivotmerge_gui.assets import app_icon_path, resources_dir
where = pivotmerge_gui.__file__
print(where, resources_dir(), app_icon_path(48), sep="\n")
assert "site-packages" in where, f"not the installed copy: {where}"
assert "site-packages" in str(app_icon_path(48)), "icon not found inside the installed package"
EOF

step "pivotmerge methods"
"$bin/pivotmerge" methods > "$work/methods.txt"
sed -n 1,4p "$work/methods.txt"
echo "... $(grep -c 'https://' "$work/methods.txt") methods listed"
grep -q "^task_arithmetic" "$work/methods.txt"

step "pivotmerge inspect <demo expert from the installed package>"
expert="$("$bin/python" -c 'from pivotmerge_gui.demo import kit; print(kit.expert_paths("shared")[0])')"
case "$expert" in *site-packages*) ;; *) echo "demo expert is not from the installed package: $expert" >&2; exit 1 ;; esac
"$bin/pivotmerge" inspect "$expert"

step "pivotmerge-gui --demo --screenshot (offscreen)"
shot="$work/screenshot.png"
rm -f "$shot"
QT_QPA_PLATFORM=offscreen "$bin/pivotmerge-gui" --demo --screenshot "$shot"
"$bin/python" - "$shot" <<'EOF'
import struct, sys
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
w, h = struct.unpack(">II", data[16:24])
assert w >= 400 and h >= 300, f"suspiciously small screenshot {w}x{h}"
print(f"ok: {sys.argv[1]} {w}x{h}, {len(data)} bytes")
EOF

echo
echo "wheel check passed: $wheel"
