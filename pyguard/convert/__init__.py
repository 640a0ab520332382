"""Making pyguard files: from Hugging Face checkpoints (with calibration), from Meta's ExecuTorch .pte, and random-weight checkpoints for the demo and the tests."""
