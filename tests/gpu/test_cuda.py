"""GPU tier: members on CUDA (`pytest -m gpu`; skipped where `torch.cuda.is_available()`
is false, so CI on CPUs selects these tests and skips them).

Greedy outputs on CUDA in float32 equal the CPU outputs token for token for every fusion
method, with fusion on the members' GPU and with fusion moved to the CPU
(`fusion_device`); batching, streaming, cancelling a stream, constraints and a failing
member behave on CUDA as on the CPU; half-precision members run. The last tests do the
same on the default pair (also marked `integration`: they need the model packages).

Greedy equality is what float32 on two devices can promise for these members: the two
devices' kernels add in other orders, so logits differ in the last bits, which changes a
token only on a near tie. A failure here is worth reading, not only rerunning.
"""

from __future__ import annotations

import json

import pytest
import torch

from deepen_engine import DEFAULT_MEMBERS, Ensemble, MemberError, MemberSpec
from deepen_engine.decoding import member_batch as sync
from tests.conftest import IDLE, forward_module, tiny_gemma3, tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROMPTS = ["The capital of France is", "Q: What is 12 + 7?\nA:", "def add(a, b):"]
N = 12
METHODS = ["deepen", "union", "unite"]


def _tiny(bpe_tokenizer, sp_tokenizer, device: str, dtype=torch.float32, **fusion) -> Ensemble:
    """The tiny pair (the same weights as `tiny_pair`: same seeds), fresh models on `device`."""
    llama = tiny_llama(len(bpe_tokenizer)).to(dtype)
    gemma = tiny_gemma3(len(sp_tokenizer)).to(dtype)
    members = [
        MemberSpec(source=(llama, bpe_tokenizer), name="tiny-llama", device=device),
        MemberSpec(source=(gemma, sp_tokenizer), name="tiny-gemma", device=device),
    ]
    return Ensemble(members, min_anchors=50, **fusion)


@pytest.fixture(scope="module")
def on_cpu(bpe_tokenizer, sp_tokenizer):
    return _tiny(bpe_tokenizer, sp_tokenizer, "cpu")


@pytest.fixture(scope="module")
def on_cuda(bpe_tokenizer, sp_tokenizer):
    return _tiny(bpe_tokenizer, sp_tokenizer, "cuda")


def _ids(results):
    return [r.token_ids for r in results]


def test_members_and_their_logits_stay_on_the_gpu(on_cuda):
    assert all(m.device.type == "cuda" for m in on_cuda.members)
    made = []
    init = sync.MemberBatch.__init__

    def recording(self, *args, **kwargs):
        made.append(self)
        init(self, *args, **kwargs)

    sync.MemberBatch.__init__ = recording
    try:
        events = on_cuda.stream(PROMPTS[0], max_new_tokens=3)
        next(e for e in events if e.delta)
        logits = [b.logits for b in made if b.logits is not None]
        events.close()
    finally:
        sync.MemberBatch.__init__ = init
    assert logits and all(x.device.type == "cuda" for x in logits)
    spaces = on_cuda.fuser.spaces
    assert all(s.device.type == "cuda" for s in spaces)


@pytest.mark.parametrize("method", METHODS)
def test_greedy_outputs_on_cuda_equal_the_cpu_outputs(on_cpu, on_cuda, method):
    cpu = on_cpu.with_fusion(method=method).generate(PROMPTS, max_new_tokens=N)
    cuda = on_cuda.with_fusion(method=method).generate(PROMPTS, max_new_tokens=N)
    assert _ids(cuda) == _ids(cpu)
    assert [r.text for r in cuda] == [r.text for r in cpu]


@pytest.mark.parametrize("method", METHODS)
def test_fusion_on_the_cpu_with_members_on_cuda_gives_the_same_tokens(on_cpu, on_cuda, method):
    cpu = on_cpu.with_fusion(method=method).generate(PROMPTS, max_new_tokens=N)
    split = on_cuda.with_fusion(method=method, fusion_device="cpu")
    assert _ids(split.generate(PROMPTS, max_new_tokens=N)) == _ids(cpu)


@pytest.mark.parametrize("gate", ["agree", "confident"])
def test_gates_on_cuda_equal_the_cpu(on_cpu, on_cuda, gate):
    cpu = on_cpu.with_fusion(gate=gate).generate(PROMPTS, max_new_tokens=N)
    assert _ids(on_cuda.with_fusion(gate=gate).generate(PROMPTS, max_new_tokens=N)) == _ids(cpu)


def test_a_batch_on_cuda_gives_each_row_its_solo_output(on_cuda):
    together = on_cuda.generate(PROMPTS, max_new_tokens=N)
    alone = [on_cuda.generate(p, max_new_tokens=N) for p in PROMPTS]
    assert _ids(together) == [r.token_ids for r in alone]


def test_streamed_text_on_cuda_equals_the_generated_text(on_cuda):
    events = list(on_cuda.stream(PROMPTS, max_new_tokens=N))
    streamed = ["".join(e.delta for e in events if e.index == b) for b in range(len(PROMPTS))]
    assert streamed == [r.text for r in on_cuda.generate(PROMPTS, max_new_tokens=N)]


def test_closing_a_stream_on_cuda_frees_its_rows(on_cuda):
    expected = _ids(on_cuda.generate(PROMPTS, max_new_tokens=N))
    events = on_cuda.stream(PROMPTS, max_new_tokens=200)
    next(e for e in events if e.delta)
    events.close()
    assert on_cuda.queue_state() == IDLE
    assert _ids(on_cuda.generate(PROMPTS, max_new_tokens=N)) == expected


def test_seeded_sampling_on_cuda_repeats_itself(on_cuda):
    settings = {"max_new_tokens": N, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    first = on_cuda.generate(PROMPTS, **settings)
    again = on_cuda.generate(PROMPTS, **settings)
    alone = on_cuda.generate(PROMPTS[1], **settings)
    assert _ids(first) == _ids(again)
    assert first[1].token_ids == alone.token_ids  # a row's draws do not depend on the batch


def test_logprobs_on_cuda_equal_the_cpu_ones(on_cpu, on_cuda):
    cpu = on_cpu.generate(PROMPTS[0], max_new_tokens=4, logprobs=2)
    cuda = on_cuda.generate(PROMPTS[0], max_new_tokens=4, logprobs=2)
    assert [e.id for e in cuda.logprobs] == [e.id for e in cpu.logprobs]
    for a, b in zip(cuda.logprobs, cpu.logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
        assert [t.id for t in a.top] == [t.id for t in b.top]


def test_a_json_constraint_on_cuda_gives_the_cpu_output(on_cpu, on_cuda):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    cpu = on_cpu.generate(PROMPTS[0], max_new_tokens=24, json_schema=schema)
    cuda = on_cuda.generate(PROMPTS[0], max_new_tokens=24, json_schema=schema)
    assert cuda.token_ids == cpu.token_ids
    if cuda.finish_reason == "eos":
        assert isinstance(json.loads(cuda.text), dict)


def test_a_failing_member_on_cuda_is_named_and_the_next_request_is_served(on_cuda):
    expected = _ids(on_cuda.generate(PROMPTS, max_new_tokens=N))
    helper = on_cuda.members[1]
    calls = {"n": 0}
    module = forward_module(helper)
    original = module.forward

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return original(*args, **kwargs)

    module.forward = forward
    try:
        with pytest.raises(MemberError) as info:
            on_cuda.generate(PROMPTS, max_new_tokens=N)
    finally:
        del module.forward
    assert info.value.member == helper.name
    assert on_cuda.queue_state() == IDLE
    assert _ids(on_cuda.generate(PROMPTS, max_new_tokens=N)) == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_members_run_with_float32_fusion(bpe_tokenizer, sp_tokenizer, dtype, method):
    ens = _tiny(bpe_tokenizer, sp_tokenizer, "cuda", dtype=dtype, method=method)
    assert {m.dtype for m in ens.members} == {dtype}
    results = ens.generate(PROMPTS, max_new_tokens=N)
    assert all(r.token_ids and r.finish_reason in ("eos", "length") for r in results)
    # the fused logits are float32 whatever the members' dtype
    logits = [torch.randn(1, len(m.vocab), device="cuda", dtype=dtype) for m in ens.members]
    assert ens.fuser.fuse(logits).dtype == torch.float32


# --- the default pair ------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_pair():
    cpu = Ensemble([MemberSpec(source=name) for name in DEFAULT_MEMBERS])
    cuda = Ensemble([MemberSpec(source=name, device="cuda") for name in DEFAULT_MEMBERS])
    return cpu, cuda


@pytest.mark.integration
@pytest.mark.parametrize("method", METHODS)
def test_default_pair_greedy_on_cuda_equals_the_cpu(default_pair, method):
    cpu, cuda = (e.with_fusion(method=method) for e in default_pair)
    prompts = ["The capital of France is", "Q: What is the capital of Japan?\nA:"]
    expected = _ids(cpu.generate(prompts, max_new_tokens=16))
    assert _ids(cuda.generate(prompts, max_new_tokens=16)) == expected


@pytest.mark.integration
def test_default_pair_in_bfloat16_answers(default_pair):
    _, cuda = default_pair
    half = Ensemble(
        [MemberSpec(source=name, device="cuda", dtype="bfloat16") for name in DEFAULT_MEMBERS]
    )
    assert {m.dtype for m in half.members} == {torch.bfloat16}
    result = half.generate("The capital of France is", max_new_tokens=8)
    assert "Paris" in result.text


# --- members spread over devices, quantized members (members/placement.py) -------------


def _folder_ensemble(folders: list[str], first: dict, **fusion) -> Ensemble:
    """The tiny pair from its folders, the first member placed by `first`."""
    members = [MemberSpec(source=folders[0], **first), MemberSpec(source=folders[1])]
    return Ensemble(members, min_anchors=50, **fusion)


def test_a_member_split_over_gpu_and_cpu_gives_the_cpu_tokens(tiny_folders, on_cpu, tmp_path):
    split = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    ens = _folder_ensemble(tiny_folders, {"device_map": split})
    member = ens.members[0]
    assert member.device == torch.device("cuda:0")
    assert member.devices == frozenset({"cuda:0", "cpu"})
    expected = _ids(on_cpu.generate(PROMPTS, max_new_tokens=N))
    assert _ids(ens.generate(PROMPTS, max_new_tokens=N)) == expected
    # batched rows: each cache layer is indexed on its own device
    assert [ens.generate(p, max_new_tokens=N).token_ids for p in PROMPTS] == expected


def test_device_map_auto_with_a_small_gpu_budget_offloads_and_matches(
    tiny_folders, on_cpu, tmp_path
):
    ens = _folder_ensemble(
        tiny_folders,
        {"device_map": "auto", "max_memory": {0: 40_000, "cpu": "1GiB"},
         "offload_folder": str(tmp_path)},
    )  # fmt: skip
    places = set(ens.members[0].device_map.values())
    assert 0 in places and places - {0}  # some modules on the GPU, the rest offloaded
    assert _ids(ens.generate(PROMPTS, max_new_tokens=N)) == _ids(
        on_cpu.generate(PROMPTS, max_new_tokens=N)
    )


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_members_run(tiny_folders, bits):
    pytest.importorskip("bitsandbytes")
    ens = _folder_ensemble(tiny_folders, {"quantization": bits, "dtype": "bfloat16"})
    linear = ens.members[0].model.model.layers[0].mlp.down_proj
    assert type(linear).__name__ == ("Linear8bitLt" if bits == "8bit" else "Linear4bit")
    results = ens.generate(PROMPTS, max_new_tokens=N)
    assert all(r.token_ids and r.finish_reason in ("eos", "length") for r in results)


@pytest.mark.integration
def test_default_pair_with_device_map_auto_equals_one_device(default_pair):
    _, cuda = default_pair
    auto = Ensemble([MemberSpec(source=name, device_map="auto") for name in DEFAULT_MEMBERS])
    assert all(m.device.type == "cuda" for m in auto.members)
    prompts = ["The capital of France is", "Q: What is the capital of Japan?\nA:"]
    assert _ids(auto.generate(prompts, max_new_tokens=16)) == _ids(
        cuda.generate(prompts, max_new_tokens=16)
    )
