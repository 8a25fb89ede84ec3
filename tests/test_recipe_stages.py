"""The recipe's stage sections: defaults, field paths in errors, hash stability."""

from __future__ import annotations

import hashlib
import json

import pytest

from amalgam.errors import RecipeError
from amalgam.recipe import STAGE_SECTIONS, CompressSpec, parse_recipe

BASIC = {"method": "linear", "models": [{"uri": "/a/m1"}, {"uri": "/a/m2"}]}


def test_sections_are_optional_and_have_defaults() -> None:
    plain = parse_recipe(BASIC)
    assert all(getattr(plain, s) is None for s in STAGE_SECTIONS)
    full = parse_recipe(
        {
            **BASIC,
            "align": {},
            "compress": {"density": 0.2},
            "evaluate": {"tasks_dir": "/t", "engine": "quick"},
            "register": {"model_name": "m", "gates": {"task_floor": {"sort": 0.9}}},
        }
    )
    assert full.align.method == "check" and full.align.vocabulary
    assert (full.compress.method, full.compress.density, full.compress.scale) == (
        "compeft",
        0.2,
        "mean",
    )
    assert full.evaluate.split == "test" and full.evaluate.limit is None
    assert full.register.experiment == "amalgam" and full.register.tracking_uri is None
    assert full.register.gates.task_floor == {"sort": 0.9}
    assert full.register.gates.max_negative_flip_rate is None


def test_unknown_and_bad_fields_are_named_by_path() -> None:
    with pytest.raises(RecipeError) as err:
        parse_recipe(
            {
                **BASIC,
                "compress": {"densty": 0.1, "keep_dense": "("},
                "evaluate": {"tasks_dir": "/t", "split": "train"},
                "register": {"model_name": "m", "gates": {"max_ppl": 2, "task_floor": "high"}},
            }
        )
    message = str(err.value)
    for path in (
        "compress.densty: Extra inputs are not permitted",
        "compress.keep_dense: Value error, invalid regex",
        "evaluate.split: Input should be 'test' or 'validation'",
        "register.gates.max_ppl: Extra inputs are not permitted",
        "register.gates.task_floor",
    ):
        assert path in message
    with pytest.raises(
        RecipeError, match=r"compress\.density: Input should be less than or equal to 1"
    ):
        parse_recipe({**BASIC, "compress": {"density": 1.5}})
    with pytest.raises(RecipeError, match=r"register\.model_name: Field required"):
        parse_recipe({**BASIC, "register": {}})


def test_tall_settings_and_compeft_settings_as_manifests_recorded_them() -> None:
    tall = parse_recipe(
        {**BASIC, "compress": {"method": "tall", "tall_lambda": {"a": 0.2, "b": 0.6}}}
    ).compress
    assert tall.settings() == {"method": "tall", "tall_lambda": {"a": 0.2, "b": 0.6}}
    # ComPEFT's settings are the fields its manifests have recorded since before TALL existed,
    # so folders compressed earlier are still found done
    assert CompressSpec(density=0.2).settings() == {
        "method": "compeft",
        "density": 0.2,
        "scale": "mean",
        "alpha": 1.0,
        "keep_dense": None,
    }
    with pytest.raises(
        RecipeError,
        match=r"compress\.tall_lambda\.constrained-float: Input should be greater than or equal",
    ):
        parse_recipe({**BASIC, "compress": {"method": "tall", "tall_lambda": -0.1}})
    with pytest.raises(
        RecipeError, match=r"compress\.method: Input should be 'compeft', 'tall' or 'mc_smoe'"
    ):
        parse_recipe({**BASIC, "compress": {"method": "zip"}})


def test_the_hash_changes_only_when_a_section_is_present() -> None:
    plain = parse_recipe(BASIC)
    body_without = plain.model_dump(mode="json", exclude={"output", "storage_options", "executor"})
    assert all(body_without[s] is None for s in STAGE_SECTIONS)
    # the hash recipes had before the sections (and before extra_tensors and the adapter
    # output fields, counted when set)
    later = (
        *STAGE_SECTIONS,
        "extra_tensors",
        "output_format",
        "adapter_output",
        "slices",
        "layer_swap",
    )
    before = {k: v for k, v in body_without.items() if k not in later}
    digest = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    assert plain.hash() == "sha256:" + digest
    assert plain.hash() == "sha256:8ccf14ad69b21ea8fd7373e19712e80b588ed704b0f731b3527791f8c8b88648"
    assert parse_recipe({**BASIC, "extra_tensors": "error"}).hash() == plain.hash()
    assert parse_recipe({**BASIC, "output_format": "dense"}).hash() == plain.hash()
    kept = parse_recipe({**BASIC, "extra_tensors": "keep_from_first"})
    assert kept.hash() != plain.hash() != parse_recipe({**BASIC, "extra_tensors": "drop"}).hash()
    # an align section hashes as it did before it had sections of its own
    checked = parse_recipe({**BASIC, "align": {}})
    body = checked.model_dump(mode="json", exclude={"output", "storage_options", "executor"})
    body["align"] = {"method": "check", "vocabulary": True}
    before = {k: v for k, v in body.items() if k not in later or k == "align"}
    digest = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    assert checked.hash() == "sha256:" + digest
    tokenizer = parse_recipe({**BASIC, "align": {"method": "vocab", "tokenizer": {}}})
    assert tokenizer.hash() != parse_recipe({**BASIC, "align": {"method": "vocab"}}).hash()
    with_compress = parse_recipe({**BASIC, "compress": {}})
    assert with_compress.hash() != plain.hash()
    assert parse_recipe({**BASIC, "compress": {}}).hash() == with_compress.hash()
