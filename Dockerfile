# nfserve: one image for the API (`nfserve serve`) and the training workers (`nfserve worker`).
#
#   docker build -t nfserve .                                   # CPU PyTorch
#   docker build -t nfserve:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
#
# Settings come from NFSERVE_* environment variables (see service/settings.py). The image installs
# the `server` extra (engine and service); the package alone is only the client.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# PyTorch first, from the index of the wanted build (CPU by default), so that the layer is cached
# and the project's own `torch==2.13.0` requirement is already satisfied.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY nfcore ./nfcore
COPY service ./service
RUN pip install ".[server]"

# The demo models seed the model-store volume the first time it is mounted.
COPY models /models
RUN useradd --create-home --uid 10001 nfserve \
    && mkdir -p /data \
    && chown -R nfserve:nfserve /data /models
USER nfserve

ENV NFSERVE_HOST=0.0.0.0 \
    NFSERVE_PORT=8000 \
    NFSERVE_DATA_DIR=/data \
    NFSERVE_MODELS_DIR=/models
VOLUME ["/data", "/models"]
EXPOSE 8000

# Alone, the image is the embedded mode: the API plus one worker, SQLite and SqliteHuey in /data.
CMD ["nfserve", "serve"]
