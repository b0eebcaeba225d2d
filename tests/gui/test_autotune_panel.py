"""AutoTunePanel: live plot per generation, result summary, Apply, cancel keeps the best."""

from __future__ import annotations

import pytest

from pivotmerge_gui.gui.panels.autotune import AutoTunePanel

kit = pytest.importorskip("pivotmerge_gui.demo.kit")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def panel(qtbot, demo_world):
    p = AutoTunePanel()
    qtbot.addWidget(p)
    p.set_experts(kit.load_experts("shared"), kit.load_projector_file(kit.base_path("shared")))
    p.set_method("task_arithmetic", {"scaling": 1.0})
    p.set_backend(demo_world.backend)
    p.set_pairs(demo_world.caption_sets("val", 4), demo_world.caption_sets("test", 4))
    yield p
    if p.worker is not None:
        p.cancel()
        p.worker.wait(10_000)


def test_run_plots_each_generation_and_applies_the_best(qtbot, panel):
    panel.gen_spin.setValue(3)
    panel.pop_spin.setValue(4)
    assert not panel.apply_button.isEnabled()
    with qtbot.waitSignal(panel.tune_finished, timeout=60_000) as sig:
        panel.run()
    res = sig.args[0]
    assert [r.generation for r in panel.records] == [1, 2, 3]
    xs, ys = panel.best_curve.getData()
    assert list(xs) == [1, 2, 3] and list(ys) == [r.best_fitness for r in res.history]
    assert res.best_fitness >= res.initial_fitness and res.holdout_fitness is not None
    assert panel.table.rowCount() == 2 and panel.table.item(1, 2).text() == f"{res.best.layer_coefficients['2']:.3f}"
    assert "held-out test" in panel.summary.text()
    qtbot.waitUntil(lambda: panel.apply_button.isEnabled(), timeout=10_000)
    with qtbot.waitSignal(panel.apply_requested, timeout=2000) as applied:
        panel.apply_button.click()
    assert applied.args[0].layer_coefficients == res.best.layer_coefficients
    assert applied.args[0].parameters == {"scaling": 1.0}


def test_cancel_keeps_best_so_far(qtbot, panel):
    panel.gen_spin.setValue(200)
    panel.pop_spin.setValue(4)
    w = panel.run()
    qtbot.waitUntil(lambda: len(panel.records) >= 1, timeout=60_000)
    with qtbot.waitSignal(w.cancelled, timeout=30_000):
        panel.cancel()
    qtbot.waitUntil(lambda: not panel.is_busy(), timeout=10_000)
    assert panel.result is None and panel.best is not None
    assert panel.apply_button.isEnabled() and "cancelled" in panel.status.text()


def test_needs_two_experts(qtbot, panel):
    panel.set_experts({"only": kit.load_projector_file(kit.expert_paths("shared")[0])})
    assert not panel.run_button.isEnabled()
    assert panel.run() is None and "two experts" in panel.last_error


def test_user_pairs_are_split_into_validation_and_held_out(qtbot, panel, demo_world):
    from pivotmerge_gui.core.evaluation.pairs import pairs_from_caption_sets

    panel.set_user_pairs(demo_world.backend, pairs_from_caption_sets(demo_world.caption_sets("test", 4)))
    panel.gen_spin.setValue(1)
    panel.pop_spin.setValue(2)
    with qtbot.waitSignal(panel.tune_finished, timeout=60_000) as sig:
        panel.run()
    assert sig.args[0].holdout_fitness is not None and sig.args[0].evaluations == 3
