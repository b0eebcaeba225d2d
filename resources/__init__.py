"""Data-only package: app icons and the Linux .desktop entry.

The top-level ``resources/`` folder is installed as ``pivotmerge_gui.resources``
(see ``[tool.setuptools.package-dir]`` in pyproject.toml) so that
``importlib.resources.files("pivotmerge_gui.resources")`` works in a wheel and in an
editable install. Use :mod:`pivotmerge_gui.assets` rather than paths of your own.
"""
