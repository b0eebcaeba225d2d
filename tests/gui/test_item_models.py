"""Item models: Qt's model tester, and the plain-data behaviour behind them."""

from __future__ import annotations

from PySide6.QtCore import QMimeData, Qt, QUrl

from pivotmerge_gui.gui.item_models import ExpertListModel, LayerTableModel, format_value
from pivotmerge_gui.session import ExpertEntry


def _entries() -> list[ExpertEntry]:
    return [
        ExpertEntry(spec="/a/mm_projector.bin", name="a", status="ready", family="LLaVA", shapes="8 → 16 → 12",
                    dtype="float32", size_bytes=2048, short_hash="abc"),
        ExpertEntry(spec="/b/mm_projector.bin", name="b", weight=0.5),
        ExpertEntry(spec="/c.bin", name="c", status="error", message="/c.bin: not a checkpoint"),
    ]


def test_expert_list_model_passes_model_tester(qtmodeltester):
    model = ExpertListModel()
    for e in _entries():
        model.add(e)
    qtmodeltester.check(model, force_py=True)


def test_expert_list_model_edits_reorders_and_pivot(qtbot):
    model = ExpertListModel()
    entries = _entries()
    for e in entries:
        model.add(e)
    with qtbot.waitSignal(model.experts_changed):
        assert model.setData(model.index(0, model.NAME), "vision-ocr")
    assert model.entry(0).name == "vision-ocr"
    assert not model.setData(model.index(0, model.WEIGHT), "-1")  # negative weights refused
    assert model.setData(model.index(0, model.WEIGHT), "2.5")
    assert model.entry(0).weight == 2.5
    assert model.data(model.index(2, model.NAME), Qt.ItemDataRole.ToolTipRole) == "/c.bin: not a checkpoint"
    model.setData(model.index(1, model.PIVOT), Qt.CheckState.Checked.value, Qt.ItemDataRole.CheckStateRole)
    assert model.pivot_uid == entries[1].uid
    assert model.move(1, -1) == 0
    assert [e.name for e in model.entries] == ["b", "vision-ocr", "c"]
    assert model.move(0, -1) == 0  # already at the top
    model.remove_rows([0])
    assert model.pivot_uid is None  # removing the pivot clears the mark
    assert [e.name for e in model.entries] == ["vision-ocr", "c"]


def test_expert_list_model_turns_url_drops_into_paths(qtbot, tmp_path):
    model = ExpertListModel()
    f = tmp_path / "x.bin"
    f.write_bytes(b"0")
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(f))])
    assert model.canDropMimeData(mime, Qt.DropAction.CopyAction, -1, -1, model.index(-1, -1))
    with qtbot.waitSignal(model.paths_dropped) as blocker:
        assert model.dropMimeData(mime, Qt.DropAction.CopyAction, -1, -1, model.index(-1, -1))
    assert blocker.args == [[str(f)]]
    assert not model.dropMimeData(QMimeData(), Qt.DropAction.CopyAction, -1, -1, model.index(-1, -1))


def test_layer_table_model_passes_model_tester_and_scales_bars(qtmodeltester):
    model = LayerTableModel()
    model.set_rows([
        {"layer": "0", "shape": (16, 8), "stable_rank": 2.0, "conflict_rate": 0.1},
        {"layer": "2", "shape": (12, 16), "stable_rank": 4.0, "conflict_rate": 0.3},
    ])
    qtmodeltester.check(model, force_py=True)
    assert model.columns == ["layer", "shape", "stable_rank", "conflict_rate"]
    assert model.data(model.index(0, 1)) == "16×8"
    assert model.data(model.index(1, 2), LayerTableModel.BAR_ROLE) == 1.0
    assert model.data(model.index(0, 2), LayerTableModel.BAR_ROLE) == 0.5
    assert model.data(model.index(0, 0), LayerTableModel.BAR_ROLE) is None  # text column


def test_format_value():
    assert format_value(0.123456) == "0.1235"
    assert format_value(1e-6) == "1.000e-06"
    assert format_value(True) == "yes"
    assert format_value(None) == ""


def test_expert_list_model_moves_dragged_rows_and_keeps_the_pivot(qtbot):
    model = ExpertListModel()
    for name in "abcde":
        model.add(ExpertEntry(spec=f"/{name}.bin", name=name))
    model.set_pivot(model.entry(1).uid)
    names = lambda: "".join(e.name for e in model.entries)  # noqa: E731
    # a drag carries the rows' uids in the model's own MIME type, never file URLs
    mime = model.mimeData([model.index(0, 1), model.index(0, 3), model.index(2, 0)])
    assert model.dragged_rows(mime) == [0, 2]
    assert not mime.hasUrls()
    assert model.canDropMimeData(mime, Qt.DropAction.MoveAction, 4, 0, model.index(-1, -1))
    with qtbot.waitSignal(model.experts_changed):
        assert model.dropMimeData(mime, Qt.DropAction.MoveAction, 4, 0, model.index(-1, -1))
    assert names() == "bdace"  # a and c, in their order, before e
    assert model.entry(model.pivot_index()).name == "b"  # the pivot follows its expert
    assert model.move_rows_to([4], 0) == [0] and names() == "ebdac"
    assert model.move_rows_to([0, 1], 5) == [3, 4] and names() == "daceb"
    # dropped onto an item (row -1, parent = that item): inserted before it
    assert model.dropMimeData(model.mimeData([model.index(4, 0)]), Qt.DropAction.MoveAction, -1, -1,
                              model.index(1, 0))
    assert names() == "dbace"
    # no-ops: nothing moved, no signal; stale uids are ignored
    with qtbot.assertNotEmitted(model.experts_changed):
        assert model.move_rows_to([1], 1) == [1]
        assert model.move_rows_to([1], 2) == [1]
        assert model.move_rows_to([], 0) == []
    stale = model.mimeData([model.index(0, 0)])
    model.remove_rows([0])
    assert model.dragged_rows(stale) == []
    assert not model.dropMimeData(stale, Qt.DropAction.MoveAction, 0, 0, model.index(-1, -1))
    assert names() == "bace"
