"""Everything that talks to MLflow: runs, datasets, models, plugins."""
