"""finetune-lab: fine-tuning experiments with Hugging Face, tracked and compared in MLflow."""

__version__ = "0.1.0"
