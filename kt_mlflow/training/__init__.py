"""Training translators: augmentation, the task loss and the training loop."""
