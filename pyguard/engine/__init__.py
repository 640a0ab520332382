"""The inference engine: the C kernels' wrappers and thread pools, the Llama decoder, the token-prefix cache."""
