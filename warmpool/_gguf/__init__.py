"""The model file: a GGUF header walk and the tensor table of a (possibly split) model.

``ggml`` (tensor types: block size, bytes per block) -> ``header`` (one file's header, with
struct-level reads) -> ``layout`` (every tensor of a model across its shards).  Paths only:
store names are resolved before they get here (``warmpool._stores``).
"""
