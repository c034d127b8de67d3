"""Evaluation: data-free baselines, the comparison table, figures, fine-tuning curves, the MLflow evaluator."""
