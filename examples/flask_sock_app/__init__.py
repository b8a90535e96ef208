"""A flask-sock (WebSocket) app served through rhttp-wsgi (see README.md)."""
