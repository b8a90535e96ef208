"""A Flask-SocketIO app (threading mode) served through rhttp-wsgi (see README.md)."""
