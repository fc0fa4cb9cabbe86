"""Applications built on the core model: fine-tuning (full and LoRA), chat instruction tuning, and task apps
(classification, translation, explanation) that train and run through them."""
