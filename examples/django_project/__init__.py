"""A minimal Django project served through rhttp-wsgi (see README.md)."""
