"""Compare llguidance and xgrammar as the grammar library of deepen's output constraints.

    pip install llguidance xgrammar          # xgrammar only for this comparison
    HF_HUB_OFFLINE=1 python scripts/compare_grammar_libraries.py --repeats 5 --json out.json

For each default member (Gemma-3-270m: SentencePiece, 262k ids; SmolLM2-135M: byte-level
BPE, 49k ids) and each library, built from the member's Hugging Face tokenizer as each
library documents (`llguidance.hf.from_tokenizer`, `xgrammar.TokenizerInfo
.from_huggingface`, with the member's end tokens as stop tokens; and xgrammar fed the
engine's canonical token bytes, `TokenizerInfo(..., VocabType.RAW)`):

- `setup_s`: building the library's view of the vocabulary (once per member);
- `compile_ms`: compiling the test schema and making its first matcher;
- `mask_ms`: median time to compute one step's token mask (B = 1), over every step of
  walking the test document token by token, all repeats (the libraries interleaved);
- `accept_ms`: median time to advance the matcher by the chosen token;
- `text_disagree`: ids whose bytes in the library differ from the engine's canonical
  bytes (alignment/vocabulary.py), special tokens aside;
- `specials_allowed`: special tokens (no text for the engine: `<end_of_turn>`,
  `<start_of_image>`, `<unusedN>`, ...) allowed by the masks along the walk, summed over
  steps: text the engine would not write, so the grammar and the row's text would part;
- `end_allowed`: whether the member's end tokens are allowed once the document is complete.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from deepen_engine import DEFAULT_MEMBERS, MemberSpec, load_member

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "place": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "lat": {"type": "number"}},
            "required": ["city", "lat"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "unit", "place", "tags"],
    "additionalProperties": False,
}
DOC = {
    "name": "Zoë Ångström of Paris",
    "age": 42,
    "unit": "celsius",
    "place": {"city": "東京", "lat": 35.68},
    "tags": ["a", "long tag with words", "x"],
}
_BITS = ((torch.arange(256).view(-1, 1) >> torch.arange(8)) & 1).bool()


def allowed(bitmask: torch.Tensor, width: int) -> torch.Tensor:
    """(V,) bool from a (1, W) int32 bitmask."""
    return _BITS[bitmask.view(torch.uint8).long()].view(-1)[:width]


class Llguidance:
    """llguidance, as deepen uses it."""

    name = "llguidance"

    def __init__(self, member: Any) -> None:
        import llguidance
        import llguidance.hf

        self.lib = llguidance
        eos = sorted(member.eos_ids)
        start = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(
            member.tokenizer, n_vocab=len(member.vocab), eos_token=eos
        )
        self.setup_s = time.perf_counter() - start
        self.width = len(member.vocab)

    def token_bytes(self, idx: int) -> bytes:
        return bytes(self.tok.decode_bytes([idx]))

    def compile(self) -> Any:
        options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        return self.lib.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), overrides=options)

    def matcher(self, grammar: Any) -> Any:
        return self.lib.LLMatcher(self.tok, grammar, log_level=0)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        row = bitmask[0]
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))


class Xgrammar:
    """xgrammar, from the Hugging Face tokenizer."""

    name = "xgrammar"

    def __init__(self, member: Any) -> None:
        import xgrammar

        self.lib = xgrammar
        start = time.perf_counter()
        self.info = xgrammar.TokenizerInfo.from_huggingface(
            member.tokenizer, vocab_size=len(member.vocab), stop_token_ids=sorted(member.eos_ids)
        )
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=1)
        self.setup_s = time.perf_counter() - start
        self.width = len(member.vocab)
        self.decoded = self.info.decoded_vocab

    def token_bytes(self, idx: int) -> bytes:
        return bytes(self.decoded[idx])

    def compile(self) -> Any:
        return self.compiler.compile_json_schema(
            json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": ")
        )

    def matcher(self, grammar: Any) -> Any:
        return self.lib.GrammarMatcher(grammar)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))


class XgrammarCanonical(Xgrammar):
    """xgrammar fed the engine's canonical bytes (specials as empty tokens)."""

    name = "xgrammar (engine bytes)"

    def __init__(self, member: Any) -> None:
        import xgrammar

        self.lib = xgrammar
        start = time.perf_counter()
        self.info = xgrammar.TokenizerInfo(
            [t or b"" for t in member.vocab.texts],
            xgrammar.VocabType.RAW,
            vocab_size=len(member.vocab),
            stop_token_ids=sorted(member.eos_ids),
        )
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=1)
        self.setup_s = time.perf_counter() - start
        self.width = len(member.vocab)
        self.decoded = self.info.decoded_vocab


def walk(lib: Any, grammar: Any, ids: list[int], special: torch.Tensor, figures: dict) -> None:
    """Walk the document token by token: time each mask and accept, count specials."""
    matcher = lib.matcher(grammar)
    bitmask = torch.zeros((1, (lib.width + 31) // 32), dtype=torch.int32)
    for token in ids:
        start = time.perf_counter()
        lib.fill(matcher, bitmask)
        figures["mask"].append(time.perf_counter() - start)
        mask = allowed(bitmask, lib.width)
        figures["specials"] += int((mask & special).sum())
        figures["refused"] += int(not mask[token])
        start = time.perf_counter()
        ok = lib.accept(matcher, token)
        figures["accept"].append(time.perf_counter() - start)
        figures["refused"] += int(not ok)
    lib.fill(matcher, bitmask)
    figures["end_allowed"] = bool(allowed(bitmask, lib.width)[figures["eos"]].all())


def compare(member: Any, libraries: list[type], repeats: int) -> list[dict[str, Any]]:
    """Every figure of every library on one member."""
    text = json.dumps(DOC, ensure_ascii=False)
    ids = member.tokenizer(text, add_special_tokens=False).input_ids
    texts = member.vocab.texts
    eos = sorted(member.eos_ids)
    special = torch.tensor([t is None for t in texts])
    special[eos] = False
    libs = [cls(member) for cls in libraries]
    grammars, compile_ms = [], []
    for lib in libs:
        start = time.perf_counter()
        grammars.append(lib.compile())
        lib.matcher(grammars[-1])
        compile_ms.append((time.perf_counter() - start) * 1e3)
    figures = [{"mask": [], "accept": [], "specials": 0, "refused": 0, "eos": eos} for _ in libs]
    for _ in range(repeats):  # interleaved: the machine's noise hits both alike
        for lib, grammar, fig in zip(libs, grammars, figures):
            walk(lib, grammar, ids, special, fig)
    out = []
    for lib, fig, ms in zip(libs, figures, compile_ms):
        disagree = sum(1 for i, t in enumerate(texts) if t is not None and lib.token_bytes(i) != t)
        out.append(
            {
                "member": member.name,
                "vocab": len(texts),
                "library": lib.name,
                "setup_s": round(lib.setup_s, 2),
                "compile_ms": round(ms, 1),
                "mask_ms": round(statistics.median(fig["mask"]) * 1e3, 3),
                "accept_ms": round(statistics.median(fig["accept"]) * 1e3, 3),
                "doc_tokens": len(ids),
                "doc_refused": fig["refused"],
                "text_disagree": disagree,
                "specials_allowed": fig["specials"] // repeats,
                "end_allowed": fig["end_allowed"],
            }
        )
    return out


def main() -> None:
    """Run the comparison and print a markdown table (and JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for source in DEFAULT_MEMBERS:
        member = load_member(MemberSpec(source=source))
        rows += compare(member, [Llguidance, Xgrammar, XgrammarCanonical], args.repeats)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
