"""OpenClaw Edge: `clawctl` (CLI) and `clawd` (daemon) for small language models on edge boxes.

Importing the package must stay cheap: `clawctl --help` is a hot path, so nothing heavy lives here.
"""

__version__ = "0.1.0"
