"""Offline build tools: quantizers (GGUF, ONNX) and converters. The CLI's offline commands and
clawd's admin jobs call them; the serving path never imports them."""
