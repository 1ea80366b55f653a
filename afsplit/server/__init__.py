"""`afsplit serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the engine.

One file per job:

* ``protocol.py``   request bodies (pydantic) and OpenAI's error body
* ``engine_core.py`` the engine behind the server: the single-process LLMEngine or the cluster's
  coordinator, with the load figures and keep-alive the server needs
* ``engine_loop.py`` the one thread that drives the engine (requests and aborts in, tokens out)
* ``detokenizer.py`` incremental detokenisation (never a split UTF-8 character in a chunk)
* ``output.py``     one choice's text: detokenised deltas, stop strings, finish reason
* ``chat_template.py`` messages -> prompt with the checkpoint's chat template
* ``metrics.py``    Prometheus metrics (``afsplit:*``)
* ``app.py``        the routes
* ``serve.py``      the command: engine or ranks, the HTTP socket, signals, exit codes
"""
