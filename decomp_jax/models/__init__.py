"""Our Linen models (``bert``: BERT/RoBERTa/XLM-R encoders, ``gpt2``, ``llama``) and their loading from
Hugging Face folders (``hf``)."""
