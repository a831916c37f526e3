"""nfserve's HTTP service: FastAPI application, model store, batcher, job queue and workers."""
