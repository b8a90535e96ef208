"""A tiny WSGI app module for CLI tests (imported by MODULE:APP)."""


def app(environ, start_response):  # type: ignore[no-untyped-def]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello from cli"]


def create_app(greeting: str = "hi"):  # type: ignore[no-untyped-def]
    def factory_app(environ, start_response):  # type: ignore[no-untyped-def]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [greeting.encode()]

    return factory_app
