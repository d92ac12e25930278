"""Paged KV cache: block ids (``block_manager``) and tensors (``pool``)."""
