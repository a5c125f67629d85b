"""Training: one fold x seed run (fold), its loop and inference, cross-validation, executors and MLflow tracking."""
