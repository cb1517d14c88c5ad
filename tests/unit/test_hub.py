"""Hub ids fail in seconds when the hub cannot be reached and the model is not cached,
and load from the local cache alone when it is; no test needs the network (the "hub" is
a closed or a listening port on this machine).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from deepen_engine import MemberLoadError, MemberSpec, load_member
from deepen_engine.members import hub, loading
from deepen_engine.members.member import near_embedded_name


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def unreachable_hub(monkeypatch, no_proxy, tmp_path):
    """Online mode, a hub that refuses connections, an empty local cache."""
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hub, "offline_mode", lambda: False)


@pytest.fixture
def no_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("transformers was asked to load the model")

    monkeypatch.setattr(loading, "_load_folder_or_hub", refuse)


def test_probe_of_a_closed_and_a_listening_port(monkeypatch, no_proxy):
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert hub.reachable() is False
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.hub_address() == ("127.0.0.1", server.getsockname()[1])
        assert hub.reachable() is True


def test_the_probe_asks_the_proxy_when_one_is_set(monkeypatch, no_proxy):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub.hub_address() == ("proxy.example", 3128)


def test_wrong_name_fails_at_once_with_the_embedded_hint(unreachable_hub, no_download):
    with pytest.raises(MemberLoadError) as info:
        load_member(MemberSpec(source="smollm2"))
    message = str(info.value)
    assert message.startswith(
        "Member 'smollm2' is not an embedded name (smollm2-135m-instruct, gemma-3-270m) nor "
        "an existing file or folder. Did you mean 'smollm2-135m-instruct'? It is not in the "
        "local Hugging Face cache"
    )
    assert "and the hub cannot be reached (127.0.0.1:" in message


def test_offline_mode_does_not_ask_the_hub(monkeypatch, tmp_path, no_download):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hub, "offline_mode", lambda: True)
    monkeypatch.setattr(hub, "reachable", lambda: pytest.fail("the hub was probed"))
    with pytest.raises(MemberLoadError, match="and HF_HUB_OFFLINE is set, so the hub is not"):
        load_member(MemberSpec(source="Qwen/Qwen2.5-0.5B"))


def test_cached_model_loads_from_the_cache_when_the_hub_is_unreachable(unreachable_hub, tiny_pair):
    model, tokenizer = tiny_pair[0]
    repo = Path(constants.HF_HUB_CACHE) / "models--tiny-org--tiny-llama"  # the cache's layout
    snapshot = repo / "snapshots" / "0123456789abcdef"
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    assert hub.in_local_cache("tiny-org/tiny-llama")
    member = load_member(MemberSpec(source="tiny-org/tiny-llama"))
    assert (member.name, member.source_kind) == ("tiny-org/tiny-llama", "hub")
    assert member.tokenizer.get_vocab() == tokenizer.get_vocab()
    weight = member.model.get_input_embeddings().weight
    assert torch.equal(weight, model.get_input_embeddings().weight)


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("smollm2", "smollm2-135m-instruct"),
        ("SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
        ("gemma3", "gemma-3-270m"),
        ("google/gemma-3-270m", "gemma-3-270m"),
        ("gemma-3-27m", "gemma-3-270m"),
        ("Qwen/Qwen2.5-0.5B", None),
        ("gem", None),  # too short to guess
    ],
)
def test_near_embedded_name(typed, meant):
    assert near_embedded_name(typed) == meant
