"""The transport seam to the ChatGPT backend: HTTP/SSE over httpx, WebSocket over wsproto."""
