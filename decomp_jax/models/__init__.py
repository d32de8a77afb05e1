"""Floor 1, our Flax models and their loading: ``names`` (PyTorch names and layouts of our params),
``families`` (each decoder ``model_type`` and the config keys it implements), ``llama`` (the decoder of
every Llama-like family), ``bert`` (BERT/RoBERTa/XLM-R encoders), ``gpt2``, ``hf`` (sequence classifiers
from Hugging Face folders or model packages), ``convert`` (HF folders and GGUF files to our decoder and
back), ``causal_lm`` (a decoder and its tokenizer from a folder, file or package).

May import: floor 0 (``errors``, ``guards``, ``quant``).
"""
