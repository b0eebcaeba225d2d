"""The settings form is generated from the method metadata; the pivot tick reaches the recipe."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QLineEdit, QSpinBox

from pivotmerge_gui.core.methods.base import list_methods
from pivotmerge_gui.gui.panels.merge import MergePanel, ParamFormPanel
from tests.gui.conftest import wait_idle


def test_every_registered_method_gets_a_form_from_its_metadata(qtbot):
    form = ParamFormPanel()
    qtbot.addWidget(form)
    methods = list_methods()
    assert len(methods) >= 2
    for m in methods:
        form.set_method(m)
        assert form.values() == {}, m.name  # defaults everywhere
        assert form.all_values() == {p.name: p.default for p in m.params if p.name not in form.EXTERNAL}
        for p in m.params:
            w = form.widget(p.name)
            if p.name in form.EXTERNAL:
                assert w is None
                continue
            expected = (QComboBox if p.choices is not None else QCheckBox if p.type is bool
                        else QSpinBox if p.type is int else QDoubleSpinBox if p.type is float else QLineEdit)
            assert isinstance(w, expected), (m.name, p.name)
            if isinstance(w, (QSpinBox, QDoubleSpinBox)):
                if p.min is not None:
                    assert w.minimum() == p.min
                if p.max is not None:
                    assert w.maximum() == p.max
            assert p.help.split()[0] in w.toolTip()


def test_form_values_round_trip_and_validate_in_the_core(qtbot):
    panel = MergePanel()
    qtbot.addWidget(panel)
    panel.set_methods(list_methods(), default="pivotmerge")
    assert panel.method_name() == "pivotmerge"
    form = panel.form
    sdf = form.widget("sdf")
    assert isinstance(sdf, QCheckBox) and sdf.isChecked()
    with qtbot.waitSignal(panel.changed):
        sdf.setChecked(False)
    form.set_values({"shared_energy": 0.75, "alm": "off"})
    values = form.values()
    assert values == {"sdf": False, "shared_energy": 0.75, "alm": "off"}
    assert panel.method.validate_params(values)["shared_energy"] == 0.75


def test_pivot_tick_goes_into_the_recipe(qtbot, window, expert_files):
    window.add_paths([str(expert_files[k]) for k in ("e0", "e1", "e2")])
    wait_idle(qtbot, window)
    assert window.merge_panel.set_method_name("pivotmerge")
    assert "pivot" not in window.current_recipe().parameters  # automatic
    m = window.experts
    m.setData(m.index(2, m.PIVOT), Qt.CheckState.Checked.value, Qt.ItemDataRole.CheckStateRole)
    assert window.current_recipe().parameters["pivot"] == 2
    wait_idle(qtbot, window)
    assert window.merge_panel.merge_button.isEnabled(), window.merge_reason
    result = _merge(qtbot, window)
    assert result.report["method_report"]["pivot"]["index"] == 2
    # the per-layer sliders show the coefficients ALM chose; an override reaches the recipe
    coef = window.merge_panel.coefficients
    used = result.report["method_report"]["lambdas"]
    assert set(coef.layers) == set(used)
    chk, _, spin, label = coef._rows[coef.layers[0]]
    assert label.text() == f"used {used[coef.layers[0]]:.3f}"
    chk.setChecked(True)
    spin.setValue(0.5)
    assert window.current_recipe().layer_coefficients == {coef.layers[0]: 0.5}


def _merge(qtbot, window):  # type: ignore[no-untyped-def]
    with qtbot.waitSignal(window.merge_finished, timeout=60_000) as blocker:
        window.merge_panel.merge_button.click()
    wait_idle(qtbot, window)
    return blocker.args[0]
