"""Inference engines: read the model and placement from an engine's command line (``args``,
with ``llama_flags``, generated from llama.cpp's common/arg.cpp), and run an engine as a child
with its model warmed and kept beside it (``child``, for ``warmpool run``).
"""
