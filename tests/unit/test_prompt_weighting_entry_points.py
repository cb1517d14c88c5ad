"""`weighting="prompt"`, `weight_temperature` and `prompt_score` from every entry point:
the CLI (`--json` shows the scores), the server (extra fields in,
`usage.prompt_bits_per_byte` out) and both adapters, each equal to the engine's own
answer."""

from __future__ import annotations

import json

import pytest

from deepen_engine import ConfigError, Ensemble, MemberSpec
from deepen_engine.commands.cli import main
from tests.conftest import member_args

PROMPT = "The capital of France is"
SETTINGS = {"weighting": "prompt", "weight_temperature": 0.05}
SECOND_HALF = {**SETTINGS, "prompt_score": "second-half", "main": "auto"}
EACH = pytest.mark.parametrize("settings", [SETTINGS, SECOND_HALF], ids=["whole", "second-half"])


@EACH
def test_cli_prompt_weighting_prints_the_scores(tiny_folders, capsys, settings):
    flags = ["--json"]
    for key, value in settings.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    code = main(["generate", PROMPT, "--max-new-tokens", "6", *flags, *member_args(tiny_folders)])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    reference = Ensemble([MemberSpec(source=p) for p in tiny_folders], min_anchors=50, **settings)
    expected = reference.generate(PROMPT, max_new_tokens=6)
    reference.close()
    assert out["text"] == expected.text
    scores = out["usage"]["prompt_bits_per_byte"]
    assert scores == {k: round(v, 4) for k, v in expected.usage.prompt_bits_per_byte.items()}
    assert len(scores) == 2


def test_cli_refuses_an_unknown_weighting(tiny_folders, capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", PROMPT, "--weighting", "perplexity", *member_args(tiny_folders)])
    assert info.value.code == 2
    assert "perplexity" in capsys.readouterr().err


@EACH
def test_server_extra_fields_and_usage_scores(client, tiny_ensemble, settings):
    reply = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, extra_body=settings)
    expected = tiny_ensemble.with_fusion(**settings).generate(PROMPT, max_new_tokens=8)
    assert reply.choices[0].text == expected.text
    extra = reply.usage.model_extra or {}
    assert extra["prompt_bits_per_byte"] == pytest.approx(expected.usage.prompt_bits_per_byte)
    plain = client.completions.create(model="m", prompt=PROMPT, max_tokens=8)
    assert "prompt_bits_per_byte" not in (plain.usage.model_extra or {})


def test_server_refuses_a_bad_temperature(client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError, match="weight_temperature"):
        client.completions.create(
            model="m", prompt=PROMPT, max_tokens=4, extra_body={"weight_temperature": -1}
        )
    with pytest.raises(openai.BadRequestError, match="prompt_score"):
        client.completions.create(
            model="m", prompt=PROMPT, max_tokens=4, extra_body={"prompt_score": "first-half"}
        )


@EACH
def test_adapters_pass_prompt_weighting(tiny_ensemble, settings):
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from deepen_integrations.langchain import DeepEnLLM
    from deepen_integrations.llama_index import DeepEnLLM as LlamaIndexLLM

    expected = tiny_ensemble.with_fusion(**settings).generate(PROMPT, max_new_tokens=8).text
    assert DeepEnLLM(ensemble=tiny_ensemble, max_tokens=8, **settings).invoke(PROMPT) == expected
    llama_index = LlamaIndexLLM(ensemble=tiny_ensemble, max_new_tokens=8, **settings)
    assert llama_index.complete(PROMPT).text == expected
    with pytest.raises(ConfigError, match="weighting"):
        DeepEnLLM(ensemble=tiny_ensemble, weighting="perplexity")
    with pytest.raises(ConfigError, match="prompt_score"):
        LlamaIndexLLM(ensemble=tiny_ensemble, prompt_score="first-half")
