"""A Flask app served through rhttp-wsgi (see README.md)."""
