"""trioproxy: a Codex backend proxy over a pool of ChatGPT accounts, built on Trio."""

__version__ = "0.1.0"
