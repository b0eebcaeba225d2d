"""Generate the PivotMerge Studio application icon (SVG master plus PNG sizes).

The icon is drawn as plain SVG text so it stays small, reviewable and diffable, then
rendered with Qt's own SVG renderer into the PNG sizes that Linux desktops, the Qt
window icon and PyInstaller ask for. Re-run this script after changing the drawing:

    python packaging/make_icons.py            # writes into resources/icons/
    python packaging/make_icons.py --check    # exit 1 if the committed files are stale

The picture: three coloured strands (the expert projectors) bend into one pivot node
and leave it as a single white strand (the merged projector), on a rounded dark tile.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

#: PNG edge lengths written next to the SVG; the freedesktop hicolor theme sizes.
SIZES: tuple[int, ...] = (16, 24, 32, 48, 64, 128, 256)

#: Base file name shared by the SVG, the PNGs, the .desktop ``Icon=`` key and hicolor.
ICON_NAME = "pivotmerge-studio"

REPO_ROOT = Path(__file__).resolve().parent.parent
ICON_DIR = REPO_ROOT / "resources" / "icons"


def icon_svg() -> str:
    """Return the SVG source of the icon on a 256x256 canvas."""
    strands = (
        # (colour, start y) of each expert strand; all end in the pivot at (148, 128).
        ("#ff8a5c", 64),
        ("#ffd166", 128),
        ("#4ecdc4", 192),
    )
    paths = "\n".join(
        f'  <path d="M 44 {y} C 92 {y}, 104 128, 148 128" fill="none" stroke="{colour}" '
        f'stroke-width="18" stroke-linecap="round"/>'
        for colour, y in strands
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="256" height="256" viewBox="0 0 256 256">
  <title>PivotMerge Studio</title>
  <defs>
    <linearGradient id="tile" x1="0" y1="0" x2="0" y2="1">
      <stop offset="0" stop-color="#30447a"/>
      <stop offset="1" stop-color="#1a2544"/>
    </linearGradient>
  </defs>
  <rect x="8" y="8" width="240" height="240" rx="52" ry="52" fill="url(#tile)"/>
{paths}
  <path d="M 148 128 L 214 128" fill="none" stroke="#ffffff" stroke-width="20"
        stroke-linecap="round"/>
  <circle cx="148" cy="128" r="26" fill="#ffffff"/>
  <circle cx="148" cy="128" r="11" fill="#1a2544"/>
</svg>
"""


def render_png(svg: str, size: int) -> bytes:
    """Render ``svg`` to a square PNG of ``size`` pixels with Qt and return its bytes."""
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice, Qt
    from PySide6.QtGui import QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    renderer = QSvgRenderer(QByteArray(svg.encode("utf-8")))
    if not renderer.isValid():
        raise ValueError("Qt could not parse the generated icon SVG")
    image = QImage(size, size, QImage.Format.Format_ARGB32)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing, True)
    painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, True)
    renderer.render(painter)
    painter.end()
    buffer = QBuffer()
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    if not image.save(buffer, "PNG"):
        raise ValueError(f"Qt could not encode the {size}px icon as PNG")
    return bytes(buffer.data())


def expected_files() -> dict[Path, bytes]:
    """Every icon file with the exact bytes it should have."""
    # A QGuiApplication is needed for QImage/QPainter font and platform plumbing; the
    # offscreen platform keeps this usable on headless build machines.
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtGui import QGuiApplication

    _app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])
    svg = icon_svg()
    files: dict[Path, bytes] = {ICON_DIR / f"{ICON_NAME}.svg": svg.encode("utf-8")}
    for size in SIZES:
        files[ICON_DIR / f"{ICON_NAME}-{size}.png"] = render_png(svg, size)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="only report whether the icon files are up to date"
    )
    args = parser.parse_args(argv)
    files = expected_files()
    if args.check:
        # PNG bytes depend on the Qt version's encoder, so the PNGs are compared by
        # presence and the SVG (the source of truth) by content.
        stale = [
            str(path)
            for path, data in files.items()
            if not path.is_file() or (path.suffix == ".svg" and path.read_bytes() != data)
        ]
        for path in stale:
            print(f"stale or missing: {path}", file=sys.stderr)
        return 1 if stale else 0
    ICON_DIR.mkdir(parents=True, exist_ok=True)
    for path, data in files.items():
        path.write_bytes(data)
        print(f"wrote {path.relative_to(REPO_ROOT)} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
