"""moba-train: continued pretraining of long-context Llama models with MoBA sparse attention."""

__version__ = "0.1.0"
