"""Aligning vocabularies: every token's canonical text, the anchors all members share
(`vocabulary`), and tokens' relative representations over those anchors (`relative`).
"""
