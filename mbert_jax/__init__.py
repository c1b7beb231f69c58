"""mbert-jax: MobileBERT / IB-BERT pretraining and knowledge transfer in JAX/Flax."""

__version__ = "0.1.0"
