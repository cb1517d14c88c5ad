"""Converting an embedded GGUF member (parsed once, `conversion._read_once`) gives the weights
and the vocabulary transformers' own GGUF loading gives. SmolLM2, the smaller member
(about half a minute).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deepen_engine.members.conversion import convert_gguf
from deepen_engine.members.embedded import embedded_gguf

pytestmark = pytest.mark.integration


def test_conversion_equals_transformers_own_loading(tmp_path):
    path = embedded_gguf("smollm2-135m-instruct")
    folder = tmp_path / "converted"
    convert_gguf(path, folder, "smollm2-135m-instruct")
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    direct = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    mine, theirs = converted.state_dict(), direct.state_dict()
    assert sorted(mine) == sorted(theirs)
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert tokenizer.get_vocab() == reference.get_vocab()
    text = "The capital of France is Paris.\nQ: 12 + 7?"
    assert tokenizer(text).input_ids == reference(text).input_ids
