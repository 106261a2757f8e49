"""Fine-tuning: start from a pretrained model (lmforge or Hugging Face), adapt it with the training loop."""
