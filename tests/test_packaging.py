"""Release checks: .desktop entry, icons, resource lookup and what the wheel contains.

The fast tests read files only. The slow test builds the real wheel with pip and looks
inside it (run with ``pytest -m slow tests/test_packaging.py``).
"""

from __future__ import annotations

import configparser
import glob
import importlib.resources
import importlib.util
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest
import tomllib

from pivotmerge_gui import assets

REPO = Path(__file__).resolve().parent.parent
DESKTOP = REPO / "resources" / "pivotmerge-studio.desktop"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]

# Keys of the freedesktop Desktop Entry Specification 1.5 that may appear in our entry.
KNOWN_KEYS = {
    "Type",
    "Version",
    "Name",
    "GenericName",
    "NoDisplay",
    "Comment",
    "Icon",
    "Hidden",
    "OnlyShowIn",
    "NotShowIn",
    "DBusActivatable",
    "TryExec",
    "Exec",
    "Path",
    "Terminal",
    "Actions",
    "MimeType",
    "Categories",
    "Implements",
    "Keywords",
    "StartupNotify",
    "StartupWMClass",
    "PrefersNonDefaultGPU",
    "SingleMainWindow",
}
MAIN_CATEGORIES = {
    "AudioVideo",
    "Audio",
    "Video",
    "Development",
    "Education",
    "Game",
    "Graphics",
    "Network",
    "Office",
    "Science",
    "Settings",
    "System",
    "Utility",
}
BOOLEAN_KEYS = {
    "NoDisplay",
    "Hidden",
    "DBusActivatable",
    "Terminal",
    "StartupNotify",
    "PrefersNonDefaultGPU",
    "SingleMainWindow",
}
# File types the demo kit writes; the wheel's package-data must carry every one of them.
DEMO_ARTIFACT_TYPES = ("bin", "safetensors", "json", "txt")


def _desktop_entry() -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(DESKTOP.read_text(encoding="utf-8"))
    assert parser.sections() == ["Desktop Entry"]
    return dict(parser["Desktop Entry"])


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_desktop_entry_keys_follow_the_spec() -> None:
    entry = _desktop_entry()
    assert set(entry) <= KNOWN_KEYS, f"unknown keys: {set(entry) - KNOWN_KEYS}"
    assert entry["Type"] == "Application"
    assert entry["Version"] in {"1.0", "1.1", "1.2", "1.3", "1.4", "1.5"}
    assert entry["Name"] == "PivotMerge Studio"
    for key in BOOLEAN_KEYS & set(entry):
        assert entry[key] in {"true", "false"}, f"{key}={entry[key]} is not a boolean"
    for key in ("Categories", "Keywords"):
        assert entry[key].endswith(";"), f"{key} is a list and must end with ';'"
    categories = [c for c in entry["Categories"].split(";") if c]
    assert len(MAIN_CATEGORIES & set(categories)) == 1, "exactly one main category"


def test_desktop_entry_runs_our_console_script_and_names_our_icon() -> None:
    entry = _desktop_entry()
    program = entry["Exec"].split()[0]
    assert program in PYPROJECT["project"]["scripts"], f"{program} is not a console script"
    assert entry["TryExec"] == program
    assert entry["Icon"] == assets.ICON_NAME
    assert (REPO / "resources" / "icons" / f"{entry['Icon']}.svg").is_file()


def test_desktop_entry_passes_desktop_file_validate() -> None:
    tool = shutil.which("desktop-file-validate")
    if tool is None:
        pytest.skip("desktop-file-validate (desktop-file-utils) is not installed")
    result = subprocess.run([tool, str(DESKTOP)], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_icons_exist_at_every_size_with_matching_pixels() -> None:
    icon_dir = REPO / "resources" / "icons"
    for size in assets.ICON_SIZES:
        png = icon_dir / f"{assets.ICON_NAME}-{size}.png"
        assert _png_size(png) == (size, size), png
    assert {16, 32, 48, 256} <= set(assets.ICON_SIZES)
    svg = ET.parse(icon_dir / f"{assets.ICON_NAME}.svg").getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    assert svg.get("viewBox") == "0 0 256 256"


def test_committed_svg_matches_its_generator() -> None:
    spec = importlib.util.spec_from_file_location(
        "make_icons", REPO / "packaging" / "make_icons.py"
    )
    assert spec is not None and spec.loader is not None
    make_icons = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_icons)
    committed = (REPO / "resources" / "icons" / f"{assets.ICON_NAME}.svg").read_text("utf-8")
    assert committed == make_icons.icon_svg(), "run: python packaging/make_icons.py"
    assert tuple(make_icons.SIZES) == assets.ICON_SIZES
    assert make_icons.ICON_NAME == assets.ICON_NAME


def test_resource_lookup_resolves_in_this_install() -> None:
    assert assets.resource_path("pivotmerge-studio.desktop").read_bytes() == DESKTOP.read_bytes()
    assert assets.app_icon_path().suffix == ".svg"
    assert assets.app_icon_path(16).name == "pivotmerge-studio-16.png"
    assert assets.app_icon_path(20).name == "pivotmerge-studio-24.png"  # never scale up
    assert assets.app_icon_path(10_000).name == "pivotmerge-studio-256.png"
    assert assets.app_icon_path(48).is_file()
    # importlib.resources sees the same folder (editable install maps resources/ there).
    packaged = importlib.resources.files("pivotmerge_gui.resources")
    assert Path(str(packaged)).resolve() == assets.resources_dir().resolve()


def test_resource_lookup_rejects_bad_names() -> None:
    for bad in ("", "/etc/passwd", "../pyproject.toml", "icons/../../README.md"):
        with pytest.raises(ValueError, match="relative path"):
            assets.resource_path(bad)
    with pytest.raises(FileNotFoundError, match="no-such-file.png"):
        assets.resource_path("icons/no-such-file.png")
    for bad_size in (0, -16, 1.5, True):
        with pytest.raises(ValueError, match="positive"):
            assets.app_icon_path(bad_size)  # type: ignore[arg-type]


def test_resource_lookup_prefers_a_pyinstaller_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundled = tmp_path / "pivotmerge_gui" / "resources"
    shutil.copytree(REPO / "resources", bundled)
    monkeypatch.setattr(sys, "_MEIPASS", str(tmp_path), raising=False)
    assets.resources_dir.cache_clear()
    try:
        assert assets.resources_dir() == bundled
        assert assets.app_icon_path(32) == bundled / "icons" / "pivotmerge-studio-32.png"
    finally:
        assets.resources_dir.cache_clear()


def test_every_python_package_is_listed_for_the_wheel() -> None:
    listed = set(SETUPTOOLS["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "pivotmerge_gui").rglob("*.py")
        if "__pycache__" not in p.parts and "artifacts" not in p.parts
    }
    missing = on_disk - listed
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"
    assert SETUPTOOLS["package-dir"]["pivotmerge_gui.resources"] == "resources"
    stale = {
        p
        for p in listed - {"pivotmerge_gui.resources"}
        if not (REPO / Path(*p.split("."))).is_dir()
    }
    assert not stale, f"listed packages without a folder: {sorted(stale)}"


def test_package_data_covers_resources_and_demo_artifact_types(tmp_path: Path) -> None:
    data = SETUPTOOLS["package-data"]

    def covered(package: str, relative: str) -> bool:
        # Match the way setuptools does: recursive glob against real files.
        root = tmp_path / package
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).touch()
        return any(
            (root / hit).resolve() == (root / relative).resolve()
            for pattern in data.get(package, [])
            for hit in glob.glob(pattern, root_dir=root, recursive=True)
        )

    for ext in DEMO_ARTIFACT_TYPES:
        assert covered("pivotmerge_gui.demo", f"artifacts/x.{ext}"), ext
        assert covered("pivotmerge_gui.demo", f"artifacts/sub/x.{ext}"), ext
    assert not covered("pivotmerge_gui.demo", "models.pyc")
    resources = REPO / "resources"
    for path in resources.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".py":
            relative = path.relative_to(resources).as_posix()
            assert covered("pivotmerge_gui.resources", relative), relative


@pytest.mark.slow
def test_built_wheel_contains_resources_and_demo_kit(tmp_path: Path) -> None:
    # Build from a copy so build/ and *.egg-info never land in the work tree.
    source = tmp_path / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns(
        "__pycache__",
        "*.egg-info",
        "build",
        "dist",
        ".git",
        ".venv",
        ".pytest_cache",
        ".hypothesis",
    )
    for name in ("pyproject.toml", "README.md", "pivotmerge_gui", "resources"):
        item = REPO / name
        if item.is_dir():
            shutil.copytree(item, source / name, ignore=ignore)
        else:
            shutil.copy2(item, source / name)
    out = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "-w",
            str(out),
            "--no-deps",
            "--no-build-isolation",
            "-q",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = out.glob("pivotmerge_gui-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (REPO / "resources").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            rel = path.relative_to(REPO / "resources").as_posix()
            assert f"pivotmerge_gui/resources/{rel}" in names, rel
    artifacts = REPO / "pivotmerge_gui" / "demo" / "artifacts"
    shipped = [p for p in artifacts.rglob("*") if p.is_file()] if artifacts.is_dir() else []
    if not shipped:
        pytest.fail("the demo kit has no artifacts to ship (pivotmerge_gui/demo/artifacts)")
    for path in shipped:
        rel = path.relative_to(REPO).as_posix()
        assert rel in names, f"{rel} is missing from the wheel"
    assert "pivotmerge_gui/assets.py" in names
    assert not any(n.startswith(("tests/", "packaging/", "resources/")) for n in names)


def _load_entry_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "pivotmerge_studio_entry", REPO / "packaging" / "pivotmerge_studio_entry.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundle_entry_runs_the_cli_under_the_pivotmerge_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = _load_entry_module()
    monkeypatch.setattr(sys, "argv", ["/opt/pivotmerge-studio/pivotmerge", "methods"])
    assert entry.main() == 0
    out = capsys.readouterr().out
    assert "task_arithmetic" in out and "ties" in out


def test_packaging_scripts_are_executable_and_parse() -> None:
    for script in ("build.sh", "check_wheel.sh", "linux/install-desktop-entry.sh"):
        path = REPO / "packaging" / script
        assert path.stat().st_mode & 0o111, f"{script} is not executable"
        result = subprocess.run(
            ["bash", "-n", str(path)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, f"{script}: {result.stderr}"
    spec_source = (REPO / "packaging" / "pivotmerge-studio.spec").read_text(encoding="utf-8")
    compile(spec_source, "pivotmerge-studio.spec", "exec")
    assert '"pivotmerge_gui/resources"' in spec_source
    assert '"pivotmerge_gui/demo/artifacts"' in spec_source


def test_install_desktop_entry_script_installs_and_removes(tmp_path: Path) -> None:
    bundle = tmp_path / "my bundle"
    bundle.mkdir()
    exe = bundle / "pivotmerge-studio"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "share")}
    script = str(REPO / "packaging" / "linux" / "install-desktop-entry.sh")
    subprocess.run(
        ["bash", script, "--bundle", str(bundle)], env=env, check=True, capture_output=True
    )
    share = tmp_path / "share"
    installed = share / "applications" / "pivotmerge-studio.desktop"
    text = installed.read_text(encoding="utf-8")
    assert f'Exec="{exe}"' in text.splitlines()
    assert f"TryExec={exe}" in text.splitlines()
    for size in assets.ICON_SIZES:
        png = share / "icons" / "hicolor" / f"{size}x{size}" / "apps" / "pivotmerge-studio.png"
        assert _png_size(png) == (size, size)
    assert (share / "icons/hicolor/scalable/apps/pivotmerge-studio.svg").is_file()
    subprocess.run(["bash", script, "--uninstall"], env=env, check=True, capture_output=True)
    assert not installed.exists()
    assert not list((share / "icons").rglob("pivotmerge-studio.*"))
    bad = subprocess.run(
        ["bash", script, "--bundle", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1 and "not an executable" in bad.stderr


def test_cli_entry_runs_main_and_skips_the_final_collection() -> None:
    """The console script is ``entry``: ``main``'s exit code, then gc.freeze() so the
    interpreter's last collection skips torch's objects (run in a child: freezing this
    test process would keep its garbage)."""
    code = ("import gc, sys; from pivotmerge_gui.cli.main import entry; c = entry(['methods']); "
            "print('frozen', gc.get_freeze_count() > 0, 'code', c, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "frozen True code 0" in r.stderr
    assert "pivotmerge" in r.stdout  # the method table was printed
    assert PYPROJECT["project"]["scripts"]["pivotmerge"] == "pivotmerge_gui.cli.main:entry"
