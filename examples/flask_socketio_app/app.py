"""A Flask-SocketIO chat served through a reverse-HTTP/2 tunnel, unchanged.

Flask-SocketIO in ``threading`` mode (no eventlet/gevent): each Socket.IO
client on the WebSocket transport holds one app thread for its lifetime, as
in every threaded WSGI server.  Nothing here knows about rhttp-wsgi.

* ``GET /``: a chat page (the Socket.IO JavaScript client comes from a CDN in
  the page; the tests speak the protocol with a plain WebSocket client);
* ``GET /hello``: plain text;
* event ``echo``: answered to the sender with the same payload (text or bytes);
* event ``chat``: broadcast to every connected client, sender included.

One process holds every client's state: run it with one worker process (``--workers 1`` under
gunicorn) or give Flask-SocketIO a message queue (``SocketIO(app, message_queue=...)``) for more.

Run it (see README.md)::

    rhttp-wsgi worker examples.flask_socketio_app.app:app --proxy HOST:PORT --cert w.crt --key w.key --ca ca.crt
"""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask.typing import ResponseReturnValue
from flask_socketio import SocketIO, emit

app = Flask(__name__)
socketio = SocketIO(app, async_mode="threading")

PAGE = """<!doctype html>
<title>Flask-SocketIO behind rhttp-wsgi</title>
<h1>Chat, behind the tunnel</h1>
<form id="f"><input id="msg" autocomplete="off"> <button>Send</button></form>
<ol id="log"></ol>
<script src="https://cdn.socket.io/4.7.5/socket.io.min.js"></script>
<script>
  const socket = io({transports: ["websocket"]});
  const log = (text) => {
    const li = document.createElement("li");
    li.textContent = text;
    document.getElementById("log").appendChild(li);
  };
  socket.on("connect", () => log("connected as " + socket.id));
  socket.on("chat", (msg) => log(msg));
  document.getElementById("f").onsubmit = (e) => {
    e.preventDefault();
    socket.emit("chat", document.getElementById("msg").value);
  };
</script>
"""


@app.get("/")
def index() -> str:
    return PAGE


@app.get("/hello")
def hello() -> ResponseReturnValue:
    return "hello from flask-socketio\n", 200, {"Content-Type": "text/plain"}


@socketio.on("echo")
def on_echo(data: Any) -> None:
    emit("echo", data)


@socketio.on("chat")
def on_chat(data: Any) -> None:
    emit("chat", data, broadcast=True)
