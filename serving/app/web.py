"""The FastAPI app every Ingress route is declared on (serving/app/http.py, serving/app/experiment_routes.py)."""
from fastapi import FastAPI

from .openapi import install as install_docs

# no redirect of /v1/classify/ to /v1/classify (an empty 307): a JSON 404 that names the route without the slash
app = FastAPI(title="polyhead", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
install_docs(app)  # GET /openapi.json, /docs (serving/app/openapi.py)
