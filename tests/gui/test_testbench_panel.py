"""TestBenchPanel: demo pairs x projectors, results as they come, chart, scores, cancel, drops."""

from __future__ import annotations

import pytest
import torch
from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDropEvent

from pivotmerge_gui.core.evaluation import evaluate
from pivotmerge_gui.gui.panels.testbench import TestBenchPanel

kit = pytest.importorskip("pivotmerge_gui.demo.kit")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def panel(qtbot, demo_world):
    p = TestBenchPanel()
    qtbot.addWidget(p)
    p.set_experts(kit.load_experts("shared"), kit.load_projector_file(kit.base_path("shared")))
    yield p
    if p.worker is not None:
        p.cancel()
        p.worker.wait(10_000)


def test_run_fills_grid_and_chart_matching_the_metrics(qtbot, panel, demo_world):
    experts = kit.load_experts("shared")
    merged = kit.load_projector_file(kit.joint_path())
    panel.set_merged(merged, "Joint")
    panel.load_demo_samples("val", 2)
    assert panel.grid.rowCount() == 8 and not panel.grid.item(0, 0).icon().isNull()
    assert panel.selected_names() == ["shapes", "text", "count", "texture", "Joint"]
    streamed = []
    panel.bench_finished.connect(lambda _: streamed.append(sum(len(v) for v in panel._partial.values())))
    with qtbot.waitSignal(panel.bench_finished, timeout=60_000) as sig:
        panel.run()
    res = sig.args[0]
    assert streamed == [8 * 5]  # every per-pair result arrived through progress before the end
    assert panel.grid.columnCount() == 6
    sets = demo_world.caption_sets("val", 2)
    want = evaluate(demo_world.backend, experts["text"], sets, parts=("nll", "generate"))
    assert res.metrics["text"].mean.token_accuracy == pytest.approx(want.mean.token_accuracy)
    cell = panel.grid.item(2, 2).text()  # pair 2 (text domain) x the text expert
    assert cell.startswith(res.results["text"][2].caption)
    doms, vals = panel.chart_values()
    assert doms == ["shapes", "text", "count", "texture", "mean"]
    assert vals["Joint"][-1] == pytest.approx(res.metrics["Joint"].mean.token_accuracy)
    panel.metric_combo.setCurrentIndex(panel.metric_combo.findData("nll"))
    assert panel.chart_values()[1]["text"][1] == pytest.approx(want.per_domain["text"].nll, rel=1e-5)
    qtbot.waitUntil(lambda: not panel.is_busy(), timeout=10_000)
    assert panel.run_button.isEnabled() and not panel.cancel_button.isEnabled()


def test_alignment_scores_signal_carries_scores_and_calibration(qtbot, panel):
    panel.load_demo_samples("val", 2)
    with qtbot.waitSignal(panel.alignment_scores_ready, timeout=60_000) as sig:
        panel.compute_alignment_scores()
    scores, cal = sig.args
    assert scores.experts == ["shapes", "text", "count", "texture"] and scores.reference == "base"
    assert len(cal.features) == 4 and cal.features[0].shape == (2 * 16, 48)
    assert cal.domains == scores.domains


def test_cancel_stops_the_run(qtbot, panel):
    panel.load_demo_samples("val", 64)
    w = panel.run()
    with qtbot.waitSignal(w.cancelled, timeout=30_000):
        panel.cancel()
    qtbot.waitUntil(lambda: not panel.is_busy(), timeout=10_000)
    assert panel.result is None and panel.status.text() == "Cancelled."


def test_user_pairs_projector_files_drop_and_errors(qtbot, panel, tmp_path, demo_world):
    from pivotmerge_gui.core.evaluation.pairs import tensor_to_pil

    data = demo_world.dataset("test", 1)
    folder = tmp_path / "mine"
    folder.mkdir()
    for dom, d in data.items():
        tensor_to_pil(d.images[0]).save(folder / f"{dom}.png")
        (folder / f"{dom}.txt").write_text(d.captions[0])
    urls = [QUrl.fromLocalFile(str(folder)), QUrl.fromLocalFile(str(kit.experts("shared")["count"]))]
    mime = QMimeData()
    mime.setUrls(urls)
    ev = QDropEvent(QPointF(5, 5), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                    Qt.KeyboardModifier.NoModifier)
    panel.dropEvent(ev)
    assert len(panel.pairs) == 4 and {p.domain for p in panel.pairs} == {"mine"}
    assert list(panel.files) == ["count'"]  # a dropped file named like an expert stays apart
    assert "count'" in panel.projectors()
    assert not panel.add_pairs(tmp_path / "nothing-here")
    assert "no such file or folder" in panel.last_error
    bad = tmp_path / "broken.bin"
    bad.write_bytes(b"garbage")
    panel.add_projector_file(bad)
    assert "broken.bin" in panel.last_error
    with qtbot.waitSignal(panel.bench_finished, timeout=60_000) as sig:
        panel.run()
    assert len(sig.args[0].pairs) == 4


def test_llava_backend_streams_captions_into_the_grid(qtbot):
    pytest.importorskip("transformers")
    from pivotmerge_gui.core.evaluation.llava_hf import LlavaHFBackend
    from pivotmerge_gui.core.evaluation.pairs import Pair, tensor_to_pil
    from tests.factories import make_mlp_projector
    from tests.evaluation.llava_tiny import PROMPT, tiny_image_processor, tiny_llava, tiny_tokenizer

    p = TestBenchPanel()
    qtbot.addWidget(p)
    p.backend = LlavaHFBackend(tiny_llava(), tiny_tokenizer(), tiny_image_processor(), prompt=PROMPT)
    p.backend_spec = "llava:tiny"
    p.set_experts({"x": make_mlp_projector(16, 32, 32, seed=1), "y": make_mlp_projector(16, 32, 32, seed=2)})
    g = torch.Generator().manual_seed(0)
    p.set_pairs([Pair(f"a red dot {i}", "d", tensor_to_pil(torch.rand(3, 8, 8, generator=g))) for i in range(2)])
    streamed = []
    original = p._stream_cell
    p._stream_cell = lambda u: (streamed.append(u), original(u))  # type: ignore[method-assign]
    with qtbot.waitSignal(p.bench_finished, timeout=60_000) as sig:
        p.run()
    assert streamed and {u.projector for u in streamed} <= {"x", "y"}
    res = sig.args[0]
    assert p.grid.item(1, 2).text().startswith(res.results["y"][1].caption)
    qtbot.waitUntil(lambda: not p.is_busy(), timeout=10_000)
