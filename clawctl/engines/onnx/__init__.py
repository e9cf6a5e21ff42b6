"""The ONNX engines: onnxruntime-genai generation and onnxruntime embeddings."""
