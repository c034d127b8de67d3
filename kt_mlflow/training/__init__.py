"""Training translators: augmentation, recipes, the training loop and its MLflow step."""
