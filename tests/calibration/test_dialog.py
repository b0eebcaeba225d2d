"""CalibrationDialog: runs the driver on a tiny model in the background with progress,
emits calibration_written with the expert -> domain mapping, Cancel writes nothing."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("PySide6")
pytest.importorskip("transformers")

from pivotmerge_gui.core.calibration import store
from pivotmerge_gui.gui.calibration_dialog import CalibrationDialog, default_output
from tests.calibration.tiny import llava_projector_input, save_llava, write_images
from tests.evaluation.llava_tiny import tiny_llava

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.gui,
              pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_llava(tmp_path_factory.mktemp("llava") / "model")


def _dialog(qtbot, sources, **kw):  # type: ignore[no-untyped-def]
    dlg = CalibrationDialog(sources, **kw)
    qtbot.addWidget(dlg)
    return dlg


def test_dialog_writes_the_file_and_emits_the_mapping(qtbot, llava_dir, tmp_path):
    a = write_images(tmp_path / "a", [(8, 8), (10, 12), (9, 9)])
    (tmp_path / "a" / "broken.png").write_bytes(b"x")
    out = tmp_path / "cal.safetensors"
    dlg = _dialog(qtbot, {"photos": str(tmp_path / "a"), "charts": None}, encoder=str(llava_dir), output=out)
    assert [r.name for r in dlg.rows] == ["photos", "charts"] and dlg.rows[0].path == str(tmp_path / "a")
    dlg.all_tokens.setChecked(True)
    assert not dlg.tokens.isEnabled()
    dlg.device.setCurrentIndex(dlg.device.findData("cpu"))
    fractions = []
    with qtbot.waitSignal(dlg.calibration_written, timeout=60_000) as sig:
        dlg.start()
        assert dlg.busy and dlg.close_button.text() == "Cancel" and not dlg.run_button.isEnabled()
        dlg.job.worker.progressed.connect(lambda ev: fractions.append(ev.fraction))
    assert sig.args == [str(out), {"photos": "photos", "charts": None}]
    qtbot.waitUntil(lambda: not dlg.busy, timeout=10_000)
    assert dlg.run_button.isEnabled() and dlg.close_button.text() == "Close"
    assert fractions and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert dlg.progress.value() == 1000 and "photos: 3 images, 48 tokens, 1 skipped" in dlg.status.text()
    cf = store.read(out)
    assert cf.domains == ["photos"] and torch.allclose(cf.tensors["photos"], llava_projector_input(tiny_llava(), a),
                                                         atol=1e-4)
    assert cf.for_experts(["photos", "charts"], sig.args[1]).missing == [1]


def test_cancel_writes_nothing(qtbot, llava_dir, tmp_path, monkeypatch):
    import threading

    from pivotmerge_gui.core.calibration.encoders import HFVisionEncoder

    write_images(tmp_path / "a", [(8, 8)] * 6)
    gate = threading.Event()
    real = HFVisionEncoder.encode

    def slow(self, images):  # type: ignore[no-untyped-def]
        gate.wait(10)  # hold the worker in the first batch until the test has pressed Cancel
        return real(self, images)

    monkeypatch.setattr(HFVisionEncoder, "encode", slow)
    out = tmp_path / "cal.safetensors"
    dlg = _dialog(qtbot, {"a": str(tmp_path / "a")}, encoder=str(llava_dir), output=out)
    dlg.max_images.setValue(0)
    emitted = []
    dlg.calibration_written.connect(lambda *a: emitted.append(a))
    dlg.start()
    worker = dlg.job.worker
    with qtbot.waitSignal(worker.cancelled, timeout=30_000):
        dlg.close_button.click()  # "Cancel" while busy
        gate.set()
    qtbot.waitUntil(lambda: not dlg.busy, timeout=10_000)
    assert "nothing was written" in dlg.status.text() and not emitted
    assert not out.exists() and list(tmp_path.glob("*.safetensors*")) == []


def test_missing_inputs_are_named_and_errors_shown(qtbot, llava_dir, tmp_path):
    dlg = _dialog(qtbot, {"a": None}, encoder="", output=tmp_path / "c.safetensors")
    dlg.start()
    assert "Enter an encoder" in dlg.status.text() and not dlg.busy
    dlg.encoder.setText(str(llava_dir))
    dlg.start()
    assert "at least one expert" in dlg.status.text()
    dlg.rows[0].edit.setText(str(tmp_path / "missing"))
    dlg.start()
    qtbot.waitUntil(lambda: not dlg.busy, timeout=30_000)
    assert "no such folder or file" in dlg.status.text() and dlg.error is not None


def test_default_output_is_in_the_app_data_folder():
    import platformdirs

    from pivotmerge_gui.gui.settings import APP_NAME

    p = default_output()
    assert p.suffix == ".safetensors" and platformdirs.user_data_path(APP_NAME, appauthor=False) in p.parents
