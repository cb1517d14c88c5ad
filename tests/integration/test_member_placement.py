"""The default pair with SmolLM2 offloaded by accelerate (issue 25's check): with a CPU
budget of 150 MiB most of its float32 layers live on disk, and the ensemble's greedy text is
the same as with both members loaded whole. A GGUF member asked for in bfloat16 is
converted to a bfloat16 folder of its own and loads in bfloat16."""

from __future__ import annotations

import pytest
import torch

from deepen_engine import Ensemble, MemberSpec

pytestmark = pytest.mark.integration

PROMPTS = ["The capital of France is", "Q: What is the capital of Japan?\nA:"]


def test_offloaded_smollm2_gives_the_same_ensemble_text(tmp_path):
    whole = Ensemble(["smollm2-135m-instruct", "gemma-3-270m"])
    expected = [r.text for r in whole.generate(PROMPTS, max_new_tokens=12)]
    offloaded = MemberSpec(
        source="smollm2-135m-instruct",
        device_map="auto",
        max_memory={"cpu": "150MiB"},
        offload_folder=str(tmp_path),
    )
    ens = Ensemble([offloaded, "gemma-3-270m"])
    assert "disk" in ens.members[0].device_map.values()
    assert [r.text for r in ens.generate(PROMPTS, max_new_tokens=12)] == expected


def test_a_bfloat16_gguf_member_has_its_own_conversion():
    from deepen_engine import load_member

    member = load_member(MemberSpec(source="smollm2-135m-instruct", dtype="bfloat16"))
    assert member.dtype == torch.bfloat16
    assert member.model.config.name_or_path.endswith("-bfloat16")
