"""The app's Save with "Into model": a complete model folder (full-model export)."""

from __future__ import annotations

import hashlib

from tests.gui.conftest import wait_idle
from tests.io.test_export import projector_state, synthetic_model


def test_save_dialog_into_model_field(qtbot, tmp_path):
    from pivotmerge_gui.gui.dialogs import SaveDialog

    dlg = SaveDialog(str(tmp_path / "out"))
    qtbot.addWidget(dlg)
    assert dlg.into_model() == ""
    dlg.into.setText("  llava-hf/llava-1.5-7b-hf ")
    assert dlg.into_model() == "llava-hf/llava-1.5-7b-hf"


def test_window_saves_the_merge_into_a_model(qtbot, window, expert_files, tmp_path):
    model = synthetic_model(tmp_path / "model", d_in=8, d_hidden=16, d_out=12)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model.iterdir() if p.is_file()}
    window.add_paths([str(expert_files["e0"]), str(expert_files["e1"])])
    wait_idle(qtbot, window)
    assert window.merge_panel.set_method_name("linear")
    wait_idle(qtbot, window)
    with qtbot.waitSignal(window.merge_finished, timeout=60_000) as blocker:
        window.merge_panel.merge_button.click()
    wait_idle(qtbot, window)
    result = blocker.args[0]
    out = tmp_path / "full"
    w = window.save_to(out, into=str(model))
    with qtbot.waitSignal(w.stopped, timeout=30_000):
        pass
    assert w.outcome == "finished"
    assert [p.name for p in window.last_saved] == ["model-00003-of-00003.safetensors"]
    got = projector_state(out, "multi_modal_projector")
    assert got["multi_modal_projector.linear_2.weight"].equal(result.projector.layer("2").weight)
    assert "base_model" not in (out / "README.md").read_text().split("---")[1]  # a local folder: no Hub id
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model.iterdir() if p.is_file()}
