"""`lmlab serve`: an OpenAI-compatible HTTP server on the continuous-batching engine.

``create_app`` (app.py) builds the FastAPI app; protocol.py holds the OpenAI request and answer
shapes with their checks; metrics.py the Prometheus page; recording.py writes the session's
requests to the run store in batches. The CLI (``lmlab.cli.serve``) loads the models, binds the
socket and runs uvicorn.
"""

from lmlab.serve.app import MAX_BODY_BYTES, create_app

__all__ = ["create_app", "MAX_BODY_BYTES"]
