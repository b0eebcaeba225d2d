import pytest

from pivotmerge_gui.core.errors import RecipeError
from pivotmerge_gui.core.recipe import Recipe

DOC = """
merge_method: pivotmerge
base_model: init/mm_projector.bin
models:
  - model: domain_a/mm_projector.bin
    parameters: {weight: 2.0}
  - model: domain_b/mm_projector.bin
parameters: {sdf: true}
dtype: float32
out_dtype: auto
output_format: auto
device: auto
random_seed: 0
"""


def test_issue_example_parses_and_round_trips():
    r = Recipe.from_yaml(DOC)
    assert r.merge_method == "pivotmerge"
    assert r.weights == [2.0, 1.0]
    assert r.display_names() == ["domain_a", "domain_b"]
    again = Recipe.from_yaml(r.to_yaml())
    assert again == r


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("merge_method: linear\nmodels: [{model: a}]\nmodle: x\n", "unknown key 'modle'"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {wieght: 1}}]\n", "unknown key 'models.0.parameters.wieght'"),
        ("merge_method: linear\nmodels: [{model: a}]\nrandom_seed: abc\n", "'random_seed'"),
        ("merge_method: linear\nmodels: []\n", "'models'"),
        ("models: [{model: a}]\n", "missing key 'merge_method'"),
        ("merge_method: linear\nmodels: [{model: a}]\ndtype: int8\n", "'dtype'"),
        ("merge_method: linear\nmodels: [{model: a}]\noutput_format: gguf\n", "'output_format'"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: -1}}]\n", "'models.0.parameters.weight'"),
        ("- just\n- a list\n", "mapping"),
        ("merge_method: [unclosed\n", "not valid YAML"),
        ("merge_method: linear\nmodels: [{model: a}]\nschema_version: 7\n", "schema_version"),
    ],
)
def test_bad_recipes_give_one_clear_error(text, fragment):
    with pytest.raises(RecipeError) as e:
        Recipe.from_yaml(text, source="r.yml")
    assert fragment in str(e.value)
    assert str(e.value).startswith("r.yml: ")


def test_load_reports_unreadable_and_non_utf8(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe"):
        Recipe.load(tmp_path / "missing.yml")
    bad = tmp_path / "latin1.yml"
    bad.write_bytes(b"merge_method: \xe9\n")
    with pytest.raises(RecipeError, match="UTF-8"):
        Recipe.load(bad)
