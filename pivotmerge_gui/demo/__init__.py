"""The built-in demo world: a miniature LLaVA stage 1 (see README.md in this folder).

Public helpers live in :mod:`pivotmerge_gui.demo.kit`; the captioning back end in
:mod:`pivotmerge_gui.demo.backend`; ``python -m pivotmerge_gui.demo.build`` rebuilds the
shipped artifacts. Nothing is imported here so that importing the package stays cheap
(torch loads only when a submodule is used).
"""
