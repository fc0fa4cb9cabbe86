"""The verbs built on the core: generation and benchmarks from the command line, conversion between model formats
(import, export, quantize), fine-tuning (full and LoRA), chat instruction tuning, and task apps (classification,
translation, explanation) that train and run through them."""
