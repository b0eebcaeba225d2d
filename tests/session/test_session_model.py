"""The session model, driven without Qt: experts by uid, loads, readiness, calibration that
follows its experts, recipe in/out, results that belong to their inputs, autosave."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pivotmerge_gui.core.calibration import Calibration
from pivotmerge_gui.core.errors import PivotMergeError
from pivotmerge_gui.core.methods import list_methods
from pivotmerge_gui.core.recipe import Recipe
from pivotmerge_gui.session import SessionModel, describe_projector
from tests.factories import make_mlp_projector


class Recorder:
    """Collects the events a session emits."""

    def __init__(self, session: SessionModel) -> None:
        self.loads: list[tuple[int, str, str]] = []
        self.counts: dict[str, int] = {}
        self.messages: list[str] = []
        session.message.connect(self.messages.append)
        session.load_requested.connect(lambda uid, spec, target: self.loads.append((uid, spec, target)))
        for name in ("inputs_changed", "result_changed", "calibration_changed", "setup_replaced", "base_changed"):
            getattr(session, name).connect(lambda *a, name=name: self._count(name))

    def _count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1


def _ready_session(n: int = 3) -> tuple[SessionModel, Recorder]:
    s = SessionModel()
    rec = Recorder(s)
    s.set_engine(list_methods())
    for k in range(n):
        e = s.add_spec(f"/experts/e{k}/mm_projector.bin")
        p = make_mlp_projector(8, 16, 12, seed=k)
        s.load_finished(e.uid, "expert", p, describe_projector(p))
    s.update_setup("linear", {}, {}, {}, False)
    return s, rec


def test_session_model_imports_without_qt_or_torch():
    code = ("import sys, pivotmerge_gui.session; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('PySide6', 'pyqtgraph', 'torch')]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_experts_get_display_names_and_load_requests():
    s = SessionModel()
    rec = Recorder(s)
    a = s.add_spec("/runs/ocr/mm_projector.bin")
    b = s.add_spec("org/chart-projector@v2:mm_projector.bin")
    assert [e.name for e in s.experts.entries] == ["ocr", "chart-projector"]
    assert rec.loads == [(a.uid, a.spec, "expert"), (b.uid, b.spec, "expert")]
    assert s.readiness().state == "pending" and "2 expert(s) to load" in s.readiness().message


def test_readiness_messages_in_the_order_a_user_fixes_them():
    s = SessionModel()
    assert s.readiness().state == "blocked" and "at least two" in s.readiness().message
    e = s.add_spec("/x/a.bin")
    s.load_failed(e.uid, "expert", "/x/a.bin: not a checkpoint", "")
    r = s.readiness()
    assert r.state == "blocked" and "flagged expert 'a'" in r.message and "not a checkpoint" in r.message
    s.experts.remove_rows([0])
    e = s.add_spec("/x/b.bin")
    p = make_mlp_projector(8, 16, 12)
    s.load_finished(e.uid, "expert", p, describe_projector(p))
    assert "one more expert" in s.readiness().message
    e2 = s.add_spec("/x/c.bin")
    s.load_finished(e2.uid, "expert", p, describe_projector(p))
    assert s.readiness() .state == "pending" and "engine" in s.readiness().message  # engine not loaded
    s.set_engine(list_methods())
    base = s.set_base("/x/base.bin")
    assert s.readiness().state == "pending" and "base" in s.readiness().message
    s.load_failed(base.uid, "base", "bad base", "")
    assert s.readiness().state == "blocked" and "bad base" in s.readiness().message
    s.set_base(None)
    assert s.readiness().state == "check"


def test_a_load_that_finishes_after_its_expert_was_removed_is_ignored():
    s = SessionModel()
    e = s.add_spec("/x/a.bin")
    s.experts.remove_rows([0])
    p = make_mlp_projector(8, 16, 12)
    s.load_finished(e.uid, "expert", p, describe_projector(p))  # must not resurrect it
    assert s.experts.entries == []


def test_recipe_round_trip_with_pivot_weights_and_settings(tmp_path: Path):
    s, _ = _ready_session(3)
    s.experts.set_weight(1, 0.5)
    s.experts.set_pivot(s.experts.entry(2).uid)
    s.update_setup("pivotmerge", {"shared_energy": 0.8}, {"0": 0.9}, {"dtype": "float64", "random_seed": 7}, False)
    recipe = s.recipe()
    assert recipe.merge_method == "pivotmerge"
    assert recipe.parameters["pivot"] in (2, "2")
    assert recipe.weights == [1.0, 0.5, 1.0]
    assert recipe.dtype == "float64" and recipe.random_seed == 7
    assert recipe.layer_coefficients == {"0": 0.9}

    other = SessionModel()
    rec = Recorder(other)
    other.apply_recipe(recipe)  # before the engine: waits
    assert other.experts.entries == [] and rec.loads == []
    other.set_engine(list_methods())
    assert [e.spec for e in other.experts.entries] == [e.spec for e in s.experts.entries]
    assert len(rec.loads) == 3 and rec.counts["setup_replaced"] == 1
    assert other.experts.pivot_index() == 2
    assert other.method_name == "pivotmerge" and other.params["shared_energy"] == 0.8
    assert other.settings["dtype"] == "float64" and other.layer_coefficients == {"0": 0.9}
    assert other.recipe().to_yaml() == recipe.to_yaml()


def test_unknown_recipe_method_is_reported_and_keeps_the_current_method():
    s, _ = _ready_session(2)
    recipe = Recipe.from_dict({"merge_method": "linear", "models": [{"model": "/a.bin"}, {"model": "/b.bin"}]}, "t")
    recipe = recipe.model_copy(update={"merge_method": "no_such_method"})
    messages: list[str] = []
    s.message.connect(messages.append)
    assert s.apply_recipe(recipe) is False
    assert s.method_name == "linear" and "no_such_method" in messages[-1]


def test_memory_calibration_follows_its_experts_by_uid():
    s, rec = _ready_session(3)
    feats = [torch.full((4, 8), float(k)) for k in range(3)]
    s.set_memory_calibration(Calibration(feats, ["a", "b", "c"]), "test", [e.uid for e in s.experts.entries])
    assert rec.counts["calibration_changed"] == 1
    s.experts.move_rows_to([0], 3)  # a to the end
    s.experts.remove_rows([0])  # drop b
    mapped = s.calibration_for()
    assert mapped.domains == ["c", "a"]
    assert [float(f[0, 0]) for f in mapped.features] == [2.0, 0.0]
    assert s.calibration_for() is mapped  # the same object while the order holds (plan cache)
    newcomer = s.add_spec("/experts/new.bin")
    # a newcomer has no features: its domain is uncovered (protected by the merge), not an error
    mapped = s.calibration_for()
    assert mapped.features[2] is None and mapped.missing == [2] and s.uncovered_experts() == ["new"]
    s.load_finished(newcomer.uid, "expert", make_mlp_projector(8, 16, 12), {})
    s.update_setup("regmean", {}, {}, {}, False)
    assert s.plan_inputs()[2] is None
    # only when no listed expert has features is the calibration unusable
    s.experts.remove_rows([0, 1])
    with pytest.raises(PivotMergeError, match="none of the listed experts"):
        s.calibration_for()
    assert "none of the listed experts" in s.plan_inputs()[2]
    s.update_setup("linear", {}, {}, {}, False)
    assert s.plan_inputs()[2] is None  # a method that does not use calibration plans without it


def test_calibration_file_is_mapped_by_name_and_follows_its_experts(tmp_path):
    from pivotmerge_gui.core.calibration import save_calibration

    s, rec = _ready_session(3)
    names = [e.name for e in s.experts.entries]
    path = save_calibration(Calibration([torch.randn(4, 8) for _ in range(2)], [names[2], names[0]]),
                            tmp_path / "cal.safetensors")
    s.set_calibration_file(str(path))
    assert s.memory_calibration is None and s.calibration_path == str(path)
    ref = s.recipe().calibration
    assert ref.file == str(path) and len(ref.sha256) == 64
    assert ref.domains == {names[0]: names[0], names[1]: None, names[2]: names[2]}
    assert s.uncovered_experts() == [names[1]]
    s.experts.move_rows_to([2], 0)  # order does not matter: the mapping is by expert
    assert s.recipe().calibration.domains[names[2]] == names[2]
    s.set_calibration_domain(s.experts.entries[2].uid, names[0])  # the user re-maps one
    assert s.recipe().calibration.domains[names[1]] == names[0]
    assert s.calibration_label()[0] == "cal.safetensors"
    with pytest.raises(PivotMergeError, match="sha256"):
        s.set_calibration_file(str(path), sha256="0" * 64)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    s.set_calibration_path(str(bad))  # the file chooser reports, never raises
    assert s.calibration_path == str(path) and "bad.safetensors" in rec.messages[-1]


def test_a_merge_result_belongs_to_the_inputs_it_was_made_from():
    s, rec = _ready_session(2)
    s.set_result(object())
    assert s.merge_result is not None and rec.counts["result_changed"] == 1
    s.experts.set_weight(0, 2.0)  # same inputs: the result stays
    assert s.merge_result is not None
    s.experts.remove_rows([1])
    assert s.merge_result is None and rec.counts["result_changed"] == 2


def test_used_coefficients_read_from_the_report():
    s, _ = _ready_session(2)

    s.set_result(SimpleNamespace(report={"method_report": {"layers": [{"layer": "0", "coefficient": 0.7}]},
                                         "layer_coefficients_applied": {"2": 1.1}}))
    assert s.used_coefficients() == {"0": 0.7, "2": 1.1}


def test_setup_key_changes_with_the_setup_and_the_calibration():
    s, _ = _ready_session(2)
    k1 = s.setup_key(s.recipe())
    assert s.setup_key(s.recipe()) == k1
    s.allow_nonfinite = True
    k2 = s.setup_key(s.recipe())
    assert k2 != k1
    s.set_memory_calibration(Calibration([torch.zeros(2, 8)] * 2), "x", None)
    assert s.setup_key(s.recipe()) != k2


def test_autosave_and_restore(tmp_path: Path):
    s, _ = _ready_session(2)
    s.update_setup("task_arithmetic", {"scaling": 0.4}, {}, {"random_seed": 3}, False)
    path = tmp_path / "state" / "session.yml"
    path.parent.mkdir()
    assert s.autosave(path) and path.is_file()
    other = SessionModel()
    other.set_engine(list_methods())
    recipe = other.restore(path)
    assert recipe is not None and len(other.experts) == 2
    assert other.method_name == "task_arithmetic" and other.params == {"scaling": 0.4}
    assert other.settings["random_seed"] == 3
    # calibration features in memory and per-layer coefficients survive the restart
    s.update_setup("pivotmerge", {}, {"0": 0.7}, {}, False)
    feats = [torch.randn(5, 8), torch.randn(3, 8)]
    s.set_memory_calibration(Calibration(feats, ["a", "b"]), "from the bench", [e.uid for e in s.experts.entries])
    assert s.autosave(path)
    other = SessionModel()
    other.set_engine(list_methods())
    other.restore(path)
    assert other.layer_coefficients == {"0": 0.7}
    ref = other.recipe().calibration
    assert ref is not None and Path(ref.file).parent == path.parent and ref.domains == {"e0": "a", "e1": "b"}
    from pivotmerge_gui.core.calibration import load_calibration

    back = load_calibration(Path(ref.file), ["e0", "e1"], 8, ref.domains, ref.sha256)
    assert all(torch.equal(x, y) for x, y in zip(back.features, feats))
    # a calibration file that changed since is named in one message, the rest restores
    Path(ref.file).write_bytes(b"changed")
    third = SessionModel()
    msgs: list[str] = []
    third.message.connect(msgs.append)
    third.set_engine(list_methods())
    third.restore(path)
    assert len(third.experts) == 2 and third.calibration_path is None
    assert len(msgs) == 1 and "calibration" in msgs[0]
    # an unreadable session file is set aside, not fatal
    path.write_text("merge_method: [unclosed")
    assert SessionModel().restore(path) is None
    assert not path.exists() and path.with_suffix(".bad.yml").exists()
    # an empty list removes the session file
    s.experts.clear()
    assert s.autosave(path) and not path.exists()


def test_a_broken_setup_is_not_autosaved_and_does_not_raise(tmp_path: Path):
    s, _ = _ready_session(2)
    s.update_setup("linear", {}, {}, {"dtype": "float8"}, False)  # the recipe refuses it
    path = tmp_path / "session.yml"
    assert s.autosave(path) is False and not path.exists()
