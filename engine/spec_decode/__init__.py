"""Speculative decoding: drafters propose tokens, one forward pass verifies them exactly.

ngram.py drafts by prompt lookup, adaptive.py decides how many tokens each sequence drafts, and
rejection.py accepts or rejects drafts against the target model's distribution.
"""
