"""Inference: the trained model on new input, shared by training's validation, evaluation,
`medfusion predict` and `medfusion evaluate` (../shared/STYLE.md section 1: training and evaluation
both import it, never each other)."""
