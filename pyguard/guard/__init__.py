"""Llama Guard on the engine: the prompt, the answer grammar, classification and streaming."""
