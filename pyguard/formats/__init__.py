"""File formats and what they hold: geometry (config), int4/int8 layouts and their numpy reference kernels (quant), safetensors, the tokenizer, the pyguard file."""
