"""Members placed by accelerate (members/placement.py): a member offloaded in part to disk,
or split by a dict map, computes what the member loaded whole computes; bad placement
settings raise `ConfigError` naming the field; GGUF conversions are kept per dtype.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepen_engine import ConfigError, Ensemble, MemberSpec, load_member
from deepen_engine.members import conversion, loading

PROMPTS = ["The capital of France is", "def add(a, b):"]


def _weights_bytes(folder: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def _offloaded(folder: str, offload: Path, share: float = 0.85) -> MemberSpec:
    """The member at `folder` with CPU memory for `share` of its weights: accelerate keeps
    the embeddings and head on the CPU and offloads the layers to disk (0.85), or offloads
    everything, the embeddings included (0.5: it reserves room for the largest layer)."""
    return MemberSpec(
        source=folder,
        name="offloaded",
        device_map="auto",
        max_memory={"cpu": int(_weights_bytes(folder) * share)},
        offload_folder=str(offload),
    )


def _logits(member, text: str) -> torch.Tensor:
    ids = member.tokenizer(text, return_tensors="pt").input_ids.to(member.device)
    with torch.no_grad():
        return member.model(input_ids=ids).logits


@pytest.mark.parametrize(("share", "places"), [(0.85, {"cpu", "disk"}), (0.5, {"disk"})])
def test_offloaded_member_gives_the_same_logits(tiny_folders, tmp_path, share, places):
    whole = load_member(MemberSpec(source=tiny_folders[0]))
    part = load_member(_offloaded(tiny_folders[0], tmp_path, share))
    assert part.device_map is not None
    assert set(part.device_map.values()) == places  # some layers (or all) on disk
    assert part.device == torch.device("cpu") and part.devices == frozenset({"cpu"})
    assert torch.equal(part.input_embedding_weight(), whole.input_embedding_weight())
    for text in PROMPTS:
        assert torch.equal(_logits(part, text), _logits(whole, text))


def test_offloaded_member_gives_the_same_ensemble_text(tiny_folders, tmp_path):
    plain = Ensemble([MemberSpec(source=f) for f in tiny_folders], min_anchors=50)
    sharded = Ensemble([_offloaded(tiny_folders[0], tmp_path), tiny_folders[1]], min_anchors=50)
    for text in PROMPTS:
        want = plain.generate(text, max_new_tokens=12)
        got = sharded.generate(text, max_new_tokens=12)
        assert got.text == want.text
        assert got.token_ids == want.token_ids
    # batched rows (keep_rows, merge) index each cache layer on its own device
    assert [r.text for r in sharded.generate(PROMPTS, max_new_tokens=8)] == [
        r.text for r in plain.generate(PROMPTS, max_new_tokens=8)
    ]


def test_dict_device_map_splits_layers(tiny_folders, tmp_path):
    whole = load_member(MemberSpec(source=tiny_folders[0]))
    split = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    member = load_member(
        MemberSpec(source=tiny_folders[0], device_map=split, offload_folder=str(tmp_path))
    )
    assert member.device_map == split
    assert torch.equal(_logits(member, PROMPTS[0]), _logits(whole, PROMPTS[0]))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"device_map": "fast"}, "device_map='fast' is neither a strategy"),
        ({"device_map": {}}, "device_map={} places nothing"),
        ({"device_map": {"model.layers.0": "gpu"}}, "device_map['model.layers.0']='gpu'"),
        ({"device_map": {"lm_head": 3}}, "device_map['lm_head']=3: 'cuda:3' needs CUDA"),
        ({"device_map": "cuda:0"}, "device_map='cuda:0'"),
        ({"max_memory": {"cpu": "1GiB"}}, "max_memory applies to a device_map strategy"),
        ({"device_map": "auto", "max_memory": {"cpu": "lots"}}, "max_memory['cpu']='lots'"),
        ({"device_map": "auto", "max_memory": {"gpu": 10}}, "max_memory key 'gpu'"),
        ({"device_map": "auto", "max_memory": {}}, "max_memory={} must be a non-empty dict"),
        ({"offload_folder": "/tmp/x"}, "offload_folder applies with a device_map"),
        ({"device_map": {"": "disk"}}, "offload_folder is not set"),
        ({"device": "cpu", "device_map": "auto"}, "both place the member"),
        ({"quantization": "4bit"}, "quantization='4bit' quantizes with bitsandbytes"),
        ({"quantization": "3bit"}, "quantization"),
        (
            {"quantization_config": {"load_in_8bit": True}},
            "quantization_config (bitsandbytes) quantizes with bitsandbytes",
        ),
        ({"model_kwargs": {"torch_dtype": "bfloat16"}}, "use the MemberSpec field dtype"),
        ({"model_kwargs": {"load_in_4bit": True}}, "quantization='4bit' instead"),
    ],
)
def test_bad_placement_settings_name_the_field(settings, message):
    if torch.cuda.is_available() and ("cuda" in message or "bitsandbytes" in message):
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError) as err:
        MemberSpec(source="smollm2-135m-instruct", **settings)
    assert message in str(err.value)


def test_a_ready_pair_takes_no_loading_settings(tiny_pair):
    with pytest.raises(ConfigError, match="device_map apply when deepen loads the model"):
        MemberSpec(source=tiny_pair[0], device_map="auto")


def test_dict_map_naming_a_missing_module(tiny_folders):
    spec = MemberSpec(source=tiny_folders[0], device_map={"model.embed": "cpu", "": "cpu"})
    with pytest.raises(ConfigError, match=r"device_map names \['model.embed'\]"):
        load_member(spec)
    partial = MemberSpec(source=tiny_folders[0], device_map={"model.layers": "cpu"})
    with pytest.raises(ConfigError, match="device_map gives no device to 3 parameter"):
        load_member(partial)


def test_bfloat16_member_loads_in_bfloat16(tiny_folders):
    member = load_member(MemberSpec(source=tiny_folders[0], dtype="bfloat16"))
    assert member.dtype == torch.bfloat16
    assert {p.dtype for p in member.model.parameters()} == {torch.bfloat16}


def test_gguf_conversions_are_kept_per_dtype(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("DEEPEN_CACHE", str(tmp_path / "cache"))
    made: list[tuple[str, torch.dtype]] = []

    def convert(path, folder, name, dtype):
        made.append((folder.name, dtype))
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        conversion._write_marker(folder)

    monkeypatch.setattr(conversion, "convert_gguf", convert)
    f32 = loading._resolve(str(gguf), "float32")[2]
    bf16 = loading._resolve(str(gguf), "bfloat16")[2]
    assert f32 != bf16 and bf16 == f32 + "-bfloat16"
    assert [d for _, d in made] == [torch.float32, torch.bfloat16]
    loading._resolve(str(gguf), "bfloat16")  # converted once per dtype
    assert len(made) == 2


def test_adapters_take_placement_fields(tiny_folders, tmp_path):
    from deepen_integrations.langchain import DeepEnLLM
    from deepen_integrations.llama_index import DeepEnLLM as LlamaIndexLLM

    plain = Ensemble([MemberSpec(source=f) for f in tiny_folders], min_anchors=50)
    expected = plain.generate(PROMPTS[0], max_new_tokens=6).text
    offloaded = _offloaded(tiny_folders[0], tmp_path).model_dump(exclude_unset=True)
    models = [offloaded, tiny_folders[1]]  # a dict of MemberSpec fields, and a folder
    langchain = DeepEnLLM(models=models, min_anchors=50, max_tokens=6)
    assert langchain.invoke(PROMPTS[0]) == expected
    assert "disk" in langchain.ensemble.members[0].device_map.values()
    llama_index = LlamaIndexLLM(models=models, min_anchors=50, max_new_tokens=6)
    assert llama_index.complete(PROMPTS[0]).text == expected
