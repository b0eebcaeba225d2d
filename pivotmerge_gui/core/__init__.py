"""Qt-free core: every number and every file format lives here.

Nothing in this package imports Qt, pyqtgraph or prints; long work is exposed as
generators of :class:`~pivotmerge_gui.core.progress.ProgressEvent`.
"""
