"""Model references: a path, a directory, or a name in a local model store, resolved once
where a request comes in (the API's entry points, the commands).

``files`` (what every store shares) <- ``ollama``, ``hf``, ``lmstudio`` (one store each) <-
``resolve`` (the order stores are tried in, and the errors).  docs/stores.md has each layout.
"""
