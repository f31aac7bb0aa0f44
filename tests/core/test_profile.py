"""HeadProfile: round-trips through JSON, refuses a model it was not made for, and rejects every malformed
field with an error naming it."""

from __future__ import annotations

import json

import pytest

import longattn
from longattn.core.profile import SCHEMA_VERSION, HeadProfile, model_identity
from tests.conftest import tiny_model


def _profile(model, **changes) -> HeadProfile:
    ident = model_identity(model)
    layers, heads = ident["num_layers"], ident["num_heads"]
    grid = [[0.01 * (layer * heads + h) for h in range(heads)] for layer in range(layers)]
    data = dict(model=ident, settings={"retrieval_threshold": 0.05}, retrieval=grid, streaming=grid,
                hidden_sink_mass=grid, initial_sink_mass=grid)
    data.update(changes)
    return HeadProfile(**data)


def test_profile_round_trips_through_json(tmp_path):
    model = tiny_model("llama")
    profile = _profile(model)
    loaded = HeadProfile.load(profile.save(tmp_path / "p.json"))
    assert loaded == profile
    assert loaded.classes[1][3] == "retrieval" and loaded.classes[0][0] == "mixed"
    loaded.check_model(model)


def test_profile_rejects_another_schema_version(tmp_path):
    path = _profile(tiny_model("llama")).save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    data["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="schema_version"):
        HeadProfile.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        HeadProfile.load(path)


def test_profile_rejects_a_model_with_other_head_counts():
    profile = _profile(tiny_model("llama"))
    other = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(ValueError, match="2 layers x 4 heads"):
        profile.check_model(other)
    with pytest.raises(ValueError, match="profile this model"):
        longattn.apply(other, longattn.get_method("duo", profile=profile, threshold=0.05))


def test_profile_rejects_scores_of_the_wrong_shape():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="retrieval must be"):
        _profile(model, retrieval=[[0.0] * 4])


def _document(tmp_path, **changes):
    data = _profile(tiny_model("llama")).to_dict()
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            data[outer] = {**data[outer], inner: value}
        elif value is None:
            del data[key]
        else:
            data[key] = value
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    return path


def _grid(value, layers=2, heads=4):
    return [[value] * heads for _ in range(layers)]


@pytest.mark.parametrize("changes, match", [
    ({"retrieval": _grid("high")}, r"retrieval\[0\]\[0\] must be a finite number in \[0, 1\], got 'high'"),
    ({"streaming": _grid(float("nan"))}, r"streaming\[0\]\[0\] must be a finite number in \[0, 1\], got nan"),
    ({"hidden_sink_mass": _grid(1.5)}, r"hidden_sink_mass\[0\]\[0\] must be a finite number in \[0, 1\], got 1.5"),
    ({"initial_sink_mass": _grid(-0.1)}, r"initial_sink_mass\[0\]\[0\] must be a finite number"),
    ({"retrieval": _grid(True)}, r"retrieval\[0\]\[0\] must be a finite number"),
    ({"retrieval": "0.1"}, r"retrieval must be \[num_layers=2\]\[num_heads=4\]"),
    ({"model.num_kv_heads": None}, r"model.num_kv_heads must be an int >= 1, got None"),
    ({"model.num_layers": 2.5}, r"model.num_layers must be an int >= 1, got 2.5"),
    ({"model.num_heads": "4"}, r"model.num_heads must be an int >= 1, got '4'"),
    ({"model.num_kv_heads": 3}, r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
    ({"model": [2, 4]}, r"HeadProfile.model must be an object"),
    ({"settings": "fast"}, r"HeadProfile.settings must be an object"),
    ({"classes": _grid("sometimes")}, r"classes\[0\]\[0\] must be one of retrieval, streaming, mixed"),
    ({"sinks": [{"layer": 5, "head": 0, "tokens": []}]}, r"sinks\[0\].layer must be an int in \[0, 2\)"),
    ({"sinks": {"layer": 0}}, r"HeadProfile.sinks must be a list"),
    ({"retrieval": None}, r"missing field\(s\) \['retrieval'\]"),
    ({"extra": 1}, r"unknown field\(s\) \['extra'\]"),
    ({"schema_version": "1"}, r"schema_version '1' is not supported"),
])
def test_load_names_every_malformed_field(tmp_path, changes, match):
    path = _document(tmp_path, **changes)
    with pytest.raises(ValueError, match=match) as err:
        HeadProfile.load(path)
    assert str(path) in str(err.value)  # the message says which file


def test_a_model_key_missing_is_named(tmp_path):
    data = _profile(tiny_model("llama")).to_dict()
    del data["model"]["num_kv_heads"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="HeadProfile.model is missing 'num_kv_heads'"):
        HeadProfile.load(path)


def test_json_nan_is_refused_and_the_extremes_load(tmp_path):
    # json.loads accepts the non-standard NaN token, so the check has to be ours.
    path = _document(tmp_path, retrieval=_grid(0.0), streaming=_grid(1))
    assert HeadProfile.load(path).scores("streaming").eq(1.0).all()
    path.write_text(path.read_text().replace("\"retrieval\": [[0.0", "\"retrieval\": [[NaN", 1))
    with pytest.raises(ValueError, match=r"retrieval\[0\]\[0\] must be a finite number in \[0, 1\], got nan"):
        HeadProfile.load(path)
    with pytest.raises(ValueError, match="finite number"):
        HeadProfile.from_dict({**json.loads(path.read_text()), "retrieval": _grid(float("inf"))})
