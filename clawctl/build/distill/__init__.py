"""Distillation on the box: training data, the PEFT trainer, GGUF conversion and its proof."""
