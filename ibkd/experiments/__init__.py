"""Experiments on top of the distillation application: the paper reproduction (``ibkd reproduce``) and the
word-embedding comparison (``ibkd compress-embeddings``). Neither the library nor the application imports
this package."""
