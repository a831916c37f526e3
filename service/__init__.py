"""nfserve's service: the HTTP API, the online inference path, the training path, the command line
and the Python client. Importing it imports nothing, so the client installs without the server."""
