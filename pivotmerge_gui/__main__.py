from pivotmerge_gui.cli.main import entry

raise SystemExit(entry())
