"""Framework adapters for deepen ensembles (LangChain, LlamaIndex).

The adapters are thin: each maps framework settings onto one engine call. They land in
later releases; nothing is exported yet.
"""
