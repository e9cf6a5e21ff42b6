"""The llama.cpp engine (llama-cpp-python): engine, continuous batching slots, the draft model,
the loader and GGUF embeddings. Only these modules import llama_cpp."""
