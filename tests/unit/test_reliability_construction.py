"""Reliability, construction: every bad way to build an ensemble raises a `ValueError`
subclass naming the bad value and the fix; settings are checked before any model loads; a
single member is allowed and behaves exactly as that model alone."""

from __future__ import annotations

import math

import pytest

from deepen_engine import (
    AlignmentError,
    ConfigError,
    DeepenError,
    Ensemble,
    MemberLoadError,
    MemberSpec,
)
from deepen_engine import ensemble as ensemble_module
from tests.conftest import plain_greedy_ids


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a member would be loaded: the error must come first."""

    def refuse(specs):
        raise AssertionError(f"loaded {specs[0].source!r} before refusing the settings")

    monkeypatch.setattr(ensemble_module, "load_members", refuse)


def _specs(tiny_pair):
    return [
        MemberSpec(source=tiny_pair[0], name="tiny-llama"),
        MemberSpec(source=tiny_pair[1], name="tiny-gemma"),
    ]


def test_every_construction_error_is_a_value_error():
    for cls in (ConfigError, MemberLoadError, AlignmentError):
        assert issubclass(cls, ValueError) and issubclass(cls, DeepenError)


@pytest.mark.parametrize("members", [[], ()])
def test_empty_member_list(members, no_loading):
    with pytest.raises(ConfigError, match="members is empty; give at least one model"):
        Ensemble(members)


def test_a_member_that_is_not_a_model(no_loading):
    with pytest.raises(ConfigError, match=r"Cannot use 42 as a member: give a name, path"):
        Ensemble([42])


# ------------------------------------------------------------------ single member


def _plain_greedy(model, tokenizer, prompt, n):
    return plain_greedy_ids(model, tokenizer(prompt).input_ids, n)


@pytest.mark.parametrize("which", [0, 1], ids=["llama", "gemma3-sliding"])
def test_single_member_is_exactly_that_model_alone(tiny_pair, which):
    model, tokenizer = tiny_pair[which]
    ens = Ensemble([MemberSpec(source=tiny_pair[which], name="solo")])
    assert ens.anchors is None and ens.fuser.is_identity
    for prompt in ["The capital of France is", "def add(a, b):"]:
        result = ens.generate(prompt, max_new_tokens=12)
        expected = _plain_greedy(model, tokenizer, prompt, 12)
        eos = ens.members[0].eos_ids
        if result.finish_reason == "eos":
            expected = expected[: next(i for i, t in enumerate(expected) if t in eos)]
        assert result.token_ids == expected
        assert result.text == tokenizer.decode(result.token_ids)
        assert list(result.usage.fed_positions) == ["solo"]


def test_a_bare_pair_is_a_single_member(tiny_pair):
    ens = Ensemble(tiny_pair[0])
    assert len(ens.members) == 1
    assert ens.generate("Q:", max_new_tokens=4).token_ids == _plain_greedy(*tiny_pair[0], "Q:", 4)


# ------------------------------------------------------------------ duplicates


def test_the_same_model_object_twice(tiny_pair, no_loading):
    with pytest.raises(
        ConfigError,
        match=r"members\[0\] and members\[1\] are the same model .* use FusionConfig.weights",
    ):
        Ensemble([tiny_pair[0], tiny_pair[0]])
    # a different name or device does not make it another model
    with pytest.raises(ConfigError, match=r"members\[0\] and members\[2\] are the same model"):
        Ensemble(
            [
                MemberSpec(source=tiny_pair[0], name="a"),
                MemberSpec(source=tiny_pair[1], name="b"),
                MemberSpec(source=tiny_pair[0], name="c", device="cpu:0"),
            ]
        )


def test_the_same_folder_twice_under_two_spellings(tiny_folders, no_loading):
    folder = tiny_folders[0]
    with pytest.raises(ConfigError, match=r"are the same model"):
        Ensemble([folder, f"{folder}/../{folder.rsplit('/', 1)[1]}"])


def test_the_same_embedded_name_twice(no_loading):
    with pytest.raises(ConfigError, match=r"same model \('gemma-3-270m'\)"):
        Ensemble(["gemma-3-270m", "gemma-3-270m"], main=1)


def test_two_members_with_one_name(tmp_path, tiny_pair, no_loading):
    (tmp_path / "a" / "model").mkdir(parents=True)
    (tmp_path / "b" / "model").mkdir(parents=True)
    with pytest.raises(
        ConfigError, match=r"members\[0\] and members\[1\] are both named 'model'.*MemberSpec"
    ):
        Ensemble([str(tmp_path / "a" / "model"), str(tmp_path / "b" / "model")])
    with pytest.raises(ConfigError, match=r"both named 'x'"):
        Ensemble(
            [MemberSpec(source=tiny_pair[0], name="x"), MemberSpec(source=tiny_pair[1], name="x")]
        )


# ------------------------------------------------------------------ loading


def test_unknown_embedded_name_suggests_the_close_one():
    with pytest.raises(MemberLoadError) as info:
        Ensemble(["gemma-3-27m"])
    message = str(info.value)
    assert (
        "Member 'gemma-3-27m' is not an embedded name (smollm2-135m-instruct, gemma-3-270m)"
        in message
    )
    assert "Did you mean 'gemma-3-270m'?" in message


def test_missing_path():
    with pytest.raises(MemberLoadError, match=r"'/no/such/model.gguf': the path does not exist"):
        Ensemble(["/no/such/model.gguf"])


def test_folder_without_weights(tiny_pair, tmp_path):
    model, tokenizer = tiny_pair[0]
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(MemberLoadError, match=rf"Member '{tmp_path.name}': the weights could not"):
        Ensemble([str(tmp_path)])


def test_members_sharing_too_few_anchors(tiny_pair):
    with pytest.raises(
        AlignmentError,
        match=r"'tiny-llama' and 'tiny-gemma' share \d+ token texts, fewer than "
        r"min_anchors=100000.*lower FusionConfig.min_anchors",
    ):
        Ensemble(_specs(tiny_pair), min_anchors=100_000)


# ------------------------------------------------------------------ fusion settings


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0], r"weights has 1 values for 2 members; give one weight per member"),
        ([1.0, 2.0, 3.0], r"weights has 3 values for 2 members"),
        ([1.0, -0.5], r"weights: weights must be finite and >= 0, got \[1.0, -0.5\]"),
        ([0.0, 0.0], r"weights: weights must not all be zero, got \[0.0, 0.0\]"),
        ([math.nan, 1.0], r"weights: weights must be finite and >= 0, got \[nan, 1.0\]"),
        ([math.inf, 1.0], r"weights must be finite"),
        ([], r"weights must hold one number per member"),
    ],
)
def test_bad_weights(tiny_pair, weights, match, no_loading):
    with pytest.raises(ConfigError, match=match):
        Ensemble(_specs(tiny_pair), weights=weights)


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        (
            {"main": 2},
            r"FusionConfig.main=2 is out of range for 2 members; give an index from 0 to 1",
        ),
        ({"main": -1}, r"FusionConfig.main: Input should be a member index >= 0 or 'auto', got -1"),
        ({"eta": -0.1}, r"FusionConfig.eta: Input should be greater than or equal to 0, got -0.1"),
        ({"steps": -1}, r"FusionConfig.steps: Input should be greater than or equal to 0, got -1"),
        ({"top_k": 0}, r"FusionConfig.top_k: Input should be greater than or equal to 1, got 0"),
        ({"tau": 0}, r"FusionConfig.tau: Input should be greater than 0, got 0"),
        ({"eat": 0.1}, r"FusionConfig has no setting 'eat'; check the spelling"),
    ],
)
def test_bad_fusion_settings(tiny_pair, setting, match, no_loading):
    with pytest.raises(ConfigError, match=match):
        Ensemble(_specs(tiny_pair), **setting)


def test_bad_settings_on_a_view(tiny_ensemble):
    with pytest.raises(ConfigError, match=r"main=5 is out of range for 2 members"):
        tiny_ensemble.with_fusion(main=5)
    with pytest.raises(ConfigError, match=r"weights has 3 values for 2 members"):
        tiny_ensemble.with_fusion(weights=[1, 1, 1])
    with pytest.raises(ConfigError, match=r"min_anchors=100000 exceeds the \d+ anchors"):
        tiny_ensemble.with_fusion(min_anchors=100_000)
    # the ensemble itself is untouched by a refused view
    assert tiny_ensemble.fusion.main == 0 and tiny_ensemble.fusion.weights is None


def test_bad_member_settings(no_loading):
    with pytest.raises(
        ValueError, match=r"dtype must be one of \['bfloat16', 'float16', 'float32'\]"
    ):
        Ensemble([{"source": "gemma-3-270m", "dtype": "int8"}])
