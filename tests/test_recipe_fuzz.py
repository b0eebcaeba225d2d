"""Short fuzzing of the recipe parser in CI: any document gives a Recipe or a RecipeError."""

import os

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pivotmerge_gui.core.errors import RecipeError
from pivotmerge_gui.core.recipe import Recipe

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c, max_size=3)), max_leaves=8)
keys = st.sampled_from(["merge_method", "models", "base_model", "parameters", "dtype", "out_dtype",
                        "output_format", "device", "random_seed", "layer_coefficients", "schema_version", "x"])
docs = st.dictionaries(keys, values, max_size=8)


@settings(max_examples=int(os.environ.get("PM_FUZZ_EXAMPLES", "300")), deadline=None)
@given(docs)
def test_any_mapping_parses_or_raises_recipe_error(doc):
    try:
        r = Recipe.from_dict(doc)
    except RecipeError as e:
        assert str(e)
    else:
        assert Recipe.from_yaml(r.to_yaml()) == r


@settings(max_examples=int(os.environ.get("PM_FUZZ_EXAMPLES", "300")), deadline=None)
@given(st.text(max_size=200))
def test_any_text_parses_or_raises_recipe_error(text):
    try:
        Recipe.from_yaml(text)
    except RecipeError:
        pass


@settings(max_examples=int(os.environ.get("PM_FUZZ_EXAMPLES", "100")), deadline=None)
@given(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=4), st.floats(0, 10), st.integers(-2**31, 2**31))
def test_valid_recipes_round_trip(models, w, seed):
    r = Recipe.from_dict({"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": w}} for m in models], "random_seed": seed})
    assert Recipe.from_yaml(yaml.safe_dump(r.to_dict())) == r


def test_non_finite_parameters_are_refused():
    import pytest

    with pytest.raises(RecipeError, match="finite"):
        Recipe.from_dict({"merge_method": "ties", "models": [{"model": "a"}], "parameters": {"k": float("nan")}})
