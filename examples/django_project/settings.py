"""Settings of the example Django project: no database, no static files, no admin.

Environment:

* ``DJANGO_SECRET_KEY``: set it in production.  The fallback below is for the
  example only (this project signs nothing, but any real one would).
* ``DJANGO_ALLOWED_HOSTS``: comma-separated public host names the proxy
  forwards (the ``Host`` of public requests passes through the tunnel
  unchanged); default ``localhost,127.0.0.1``.
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or "django-insecure-example-only-set-DJANGO_SECRET_KEY"
DEBUG = False
ALLOWED_HOSTS = [h.strip() for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1").split(",")
                 if h.strip()]

INSTALLED_APPS: list[str] = []  # nothing that needs a database
DATABASES: dict[str, dict[str, str]] = {}

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "examples.django_project.urls"
WSGI_APPLICATION = "examples.django_project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": False,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]

# Behind the proxy: the worker derives wsgi.url_scheme from X-Forwarded-Proto
# (RHTTP_URL_SCHEME=forwarded, the default), so request.is_secure() is right
# without SECURE_PROXY_SSL_HEADER.  Serving the public side over HTTPS, also set
# CSRF_COOKIE_SECURE = True and SESSION_COOKIE_SECURE = True.  REMOTE_ADDR is the
# client's address (the worker reads the proxy's X-Forwarded-For), and the public
# Host arrives as it was sent: USE_X_FORWARDED_HOST is not needed either.

USE_TZ = True
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
