"""pyguard: Llama Guard 3 on CPUs with int4 kernels."""

from .model import Model

__all__ = ["Model"]
