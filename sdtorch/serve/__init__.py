"""The HTTP server's pieces. So far: live previews of a running job (`preview`)."""
