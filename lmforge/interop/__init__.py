"""Other projects' checkpoint formats <-> lmforge models: Hugging Face folders (hf.py), llama2.c model files
(llama2c.py) and GGUF files (gguf.py, export; gguf_import.py with gguf_arch.py and gguf_vocab.py, import).
`lmforge.loader` reads them; the `import` and `export` verbs (lmforge.apps.convert) write them."""
