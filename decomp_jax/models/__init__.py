"""Model loading: Hugging Face Flax models (``hf``)."""
