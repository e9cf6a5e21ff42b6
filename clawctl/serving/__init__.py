"""The request core without HTTP: the tier loop (generation.py), the path a routed request took
(tier_path.py), answer reuse and coalescing (dedup.py). The OpenAI routes, the Ollama routes and
the admin routes are thin faces over it."""
