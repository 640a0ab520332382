"""pyguard: Llama Guard 3 on CPUs with int4 kernels.

file -> weights (file.py, quant.py) -> forward (model.py, kernels.py) -> logits -> verdict
(tokenizer.py, prompt.py, verdict.py, guard.py).
"""

# The one version string: pyproject.toml reads it (setuptools dynamic), `pyguard --version` prints it.
__version__ = "0.1.0"

from .errors import PyguardError
from .guard.guard import Guard, Result
from .engine.model import Model
from .guard.prompt import format_prompt
from .formats.tokenizer import Tokenizer

__all__ = ["Guard", "Model", "PyguardError", "Result", "Tokenizer", "format_prompt"]
