#!/usr/bin/env bash
# Install (or remove) the PivotMerge Studio menu entry and icons for the current user.
#
# Usage:
#   packaging/linux/install-desktop-entry.sh                 # entry runs `pivotmerge-gui` from PATH
#   packaging/linux/install-desktop-entry.sh --bundle DIR    # entry runs DIR/pivotmerge-studio
#   packaging/linux/install-desktop-entry.sh --uninstall
#
# Files go under ${XDG_DATA_HOME:-~/.local/share}: applications/pivotmerge-studio.desktop
# and icons/hicolor/<N>x<N>/apps/pivotmerge-studio.png (+ scalable SVG), the places the
# freedesktop menu and icon-theme specifications search. Nothing is written system-wide.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
resources="$here/../../resources"
data_home="${XDG_DATA_HOME:-$HOME/.local/share}"
name=pivotmerge-studio
sizes=(16 24 32 48 64 128 256)
bundle=""
uninstall=0

while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) bundle="$(cd "${2:?--bundle needs a folder}" && pwd)"; shift 2 ;;
    --uninstall) uninstall=1; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

desktop="$data_home/applications/$name.desktop"
if [ "$uninstall" = 1 ]; then
  rm -f "$desktop" "$data_home/icons/hicolor/scalable/apps/$name.svg"
  for n in "${sizes[@]}"; do rm -f "$data_home/icons/hicolor/${n}x${n}/apps/$name.png"; done
  echo "removed $desktop and the $name icons"
else
  if [ -n "$bundle" ] && [ ! -x "$bundle/$name" ]; then
    echo "$bundle/$name is not an executable (build it with packaging/build.sh)" >&2
    exit 1
  fi
  mkdir -p "$data_home/applications" "$data_home/icons/hicolor/scalable/apps"
  install -m 644 "$resources/icons/$name.svg" "$data_home/icons/hicolor/scalable/apps/$name.svg"
  for n in "${sizes[@]}"; do
    mkdir -p "$data_home/icons/hicolor/${n}x${n}/apps"
    install -m 644 "$resources/icons/$name-$n.png" "$data_home/icons/hicolor/${n}x${n}/apps/$name.png"
  done
  if [ -n "$bundle" ]; then
    # Exec and TryExec take the bundle's absolute path; quote it per the Desktop Entry spec.
    exe="$bundle/$name"
    case "$exe" in *[[:space:]]*) quoted="\"$exe\"" ;; *) quoted="$exe" ;; esac
    sed -e "s|^Exec=.*|Exec=$quoted|" -e "s|^TryExec=.*|TryExec=$exe|" \
      "$resources/$name.desktop" > "$desktop.tmp"
  else
    cp "$resources/$name.desktop" "$desktop.tmp"
  fi
  chmod 644 "$desktop.tmp"
  mv -f "$desktop.tmp" "$desktop"
  echo "installed $desktop and icons under $data_home/icons/hicolor"
fi

# Refresh caches where the tools exist; desktops also notice the files without them.
if command -v update-desktop-database >/dev/null 2>&1; then
  update-desktop-database -q "$data_home/applications" || true
fi
if command -v gtk-update-icon-cache >/dev/null 2>&1 && [ -f "$data_home/icons/hicolor/index.theme" ]; then
  gtk-update-icon-cache -q -t "$data_home/icons/hicolor" || true
fi
