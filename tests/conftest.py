"""Shared fixtures: small tokenizers of both kinds trained in the test, and tiny random
causal LMs on them, so the unit tier runs in seconds with no network and no model files.
"""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Berlin is the capital of Germany, and Madrid is the capital of Spain.",
    "Q: What is 12 + 7?\nA: 19\nQ: What is 3 * 4?\nA: 12",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Zürich, Genève and Malmö have letters like ü, è and ö; 東京 is Tokyo.",
    "The quick brown fox jumps over the lazy dog. Stop here. END of text.",
    "Once upon a time there was a small model that learned to write stories.",
] * 20

TEST_DEVICE = os.environ.get("DEEPEN_TEST_DEVICE")
"""`DEEPEN_TEST_DEVICE=cuda`: every member the tests load without naming a device loads
there (a diagnostic run of the unit tier on a GPU, scripts/gpu-check.sh: it finds device
mismatches; tests that feed the tiny models CPU tensors themselves fail in it by design)."""


@pytest.fixture(scope="session", autouse=True)
def _members_on_test_device():
    if not TEST_DEVICE:
        yield
        return
    from deepen_engine.members import loading

    original = loading.load_local_member

    def load_on_test_device(spec):
        if "device" not in spec.model_fields_set and spec.placement == "local":
            spec = spec.model_copy(update={"device": TEST_DEVICE})
        return original(spec)

    loading.load_local_member = load_on_test_device
    yield
    loading.load_local_member = original


@pytest.fixture
def benchmark():
    """langchain-tests' `benchmark` fixture (its `test_init_time`) without pytest-benchmark,
    which pyproject.toml turns off: the function runs once and its result is returned."""

    def run_once(function, *args, **kwargs):
        return function(*args, **kwargs)

    return run_once


# ChatML, as SmolLM2's tokenizer has it (without its default system prompt).
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_byte_level_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE tokenizer (like SmolLM2's), trained on CORPUS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    hf.chat_template = CHATML
    return hf


def train_sentencepiece_tokenizer(vocab_size: int = 700) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE with `▁` spaces and <0xHH> byte fallback (like Gemma's)."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizers.Replace(" ", "▁")
    base.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(byte_pieces),
        special_tokens=specials,
        show_progress=False,
    )
    base.train_from_iterator(CORPUS, trainer)
    trained = base.get_vocab()
    vocab = {p: i for p, i in sorted(trained.items(), key=lambda kv: kv[1])}
    for piece in byte_pieces:  # byte-fallback pieces after the specials, as in Gemma
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in _merges(base)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens(specials)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    return hf


def _merges(tok: Tokenizer) -> list:
    import json

    return json.loads(tok.to_str())["model"]["merges"]


def tiny_llama(vocab_size: int, seed: int = 0, max_positions: int = 1024) -> LlamaForCausalLM:
    """A 2-layer random Llama; `max_positions` is its context window (the weights do not
    depend on it: the same seed gives the same model for any window)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        initializer_range=0.2,  # varied (not repetitive) greedy text from random weights
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gemma3(
    vocab_size: int, seed: int = 1, sliding_window: int = 6, max_positions: int = 1024
) -> Gemma3ForCausalLM:
    """A 2-layer random Gemma-3 (one sliding-window layer); `max_positions` as tiny_llama."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=max_positions,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"],
        initializer_range=0.2,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="session")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    return train_byte_level_tokenizer()


@pytest.fixture(scope="session")
def sp_tokenizer() -> PreTrainedTokenizerFast:
    return train_sentencepiece_tokenizer()


@pytest.fixture(scope="session")
def tiny_pair(bpe_tokenizer, sp_tokenizer):
    """Two (model, tokenizer) members with different vocabularies: Llama/BPE, Gemma3/SP."""
    return (
        (tiny_llama(len(bpe_tokenizer)), bpe_tokenizer),
        (tiny_gemma3(len(sp_tokenizer)), sp_tokenizer),
    )


PLAIN = {"main": 0, "weighting": "fixed", "prompt_score": "whole", "weight_temperature": 0.1}
"""Fusion settings of the tests about a mechanism rather than the defaults: the first member
leads every row and the weights are fixed (the defaults choose both from each prompt); a
test that turns on `weighting="prompt"` scores whole prompts at temperature 0.1."""


@pytest.fixture(scope="session")
def tiny_ensemble(tiny_pair):
    """A fused ensemble of the two tiny members with PLAIN settings (main = 0, fixed
    weights); low min_anchors for tiny vocabs; speculative steps at any batch size (the
    speculation tests decode batches of 4), the main member drafting in bfloat16 on every
    machine (`draft_precision="auto"` would only where bfloat16 is native)."""
    from deepen_engine import Ensemble, MemberSpec, SchedulerConfig

    members = [
        MemberSpec(source=tiny_pair[0], name="tiny-llama"),
        MemberSpec(source=tiny_pair[1], name="tiny-gemma"),
    ]
    limits = SchedulerConfig(speculate_max_rows=0, draft_precision="bfloat16")
    return Ensemble(members, min_anchors=50, scheduler=limits, **PLAIN)


@pytest.fixture(scope="session")
def tiny_folders(tiny_pair, tmp_path_factory) -> list[str]:
    """The two tiny members saved as local model folders (for the command line)."""
    paths = []
    for i, (model, tokenizer) in enumerate(tiny_pair):
        path = tmp_path_factory.mktemp(f"member{i}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths


def member_args(folders: list[str]) -> list[str]:
    """`deepen` arguments naming the tiny member folders."""
    return ["--model", folders[0], "--model", folders[1], "--min-anchors", "50"]


def forward_module(member) -> torch.nn.Module:
    """The module whose forward the engine calls for a member: the body under the engine's
    own output layer (members/output_layer.py), else the whole model; tests that make a
    forward fail or watch its inputs patch this one."""
    layer = member.output_layer
    return layer.body if layer is not None else member.model


def plain_greedy_ids(model, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy continuation of `ids`: exactly n new ids, EOS ignored."""
    x = torch.tensor([ids], device=model.device)
    out = model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


@contextlib.contextmanager
def running_server(app):
    """Serve an ASGI app with uvicorn on a free loopback port, in a thread; yields the
    base URL (`http://127.0.0.1:PORT`)."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


IDLE = {"running_rows": 0, "waiting_requests": 0, "kv_cache_bytes": 0}
"""`Ensemble.queue_state()` with nothing running or waiting."""
