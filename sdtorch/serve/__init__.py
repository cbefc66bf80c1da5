"""`sdtorch serve`: AUTOMATIC1111's HTTP API, a persistent job queue with live previews, and a
web page, on one loaded model (sdtorch.serve.server is the entry point)."""
