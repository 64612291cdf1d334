"""Plumbing shared by the in-process HTTP test doubles (oidcserver, dsserver).

A double is a ``Listener`` (below) on 127.0.0.1, port 0, speaking HTTP/1.1
with keep-alive, served from a daemon thread.  Subclass ``ServerDouble``, set
``handler_class`` to a ``DoubleHandler`` subclass; the handler reaches the
double (and its state) as ``self.double``.
"""

import http.server
import json
import socket
import socketserver
import threading
import traceback
import urllib.parse

BUFSIZE = 256 * 1024
HTTP_TIMEOUT = 60


class DoubleHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ctadata-test-double/1"
    timeout = HTTP_TIMEOUT  # an idle keep-alive connection is dropped after this

    @property
    def double(self):
        return self.server.double

    def log_message(self, format, *args):  # noqa: A002 - keep test output clean
        pass

    def handle_one_request(self):
        self._body_consumed = False
        try:
            super().handle_one_request()
        except (ConnectionError, socket.timeout):
            # The client went away, or sent a body we could not parse.
            self.close_connection = True

    # ---- request bodies -------------------------------------------------
    def has_body(self):
        return self.is_chunked() or int(self.headers.get("Content-Length") or 0) > 0

    def is_chunked(self):
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def iter_body(self, bufsize=BUFSIZE):
        """Yield the request body (Content-Length or chunked) in pieces of at
        most ``bufsize`` bytes; raises ConnectionError if it ends early."""
        self._body_consumed = True
        if self.is_chunked():
            while True:
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise ConnectionError("bad chunk-size line %r" % line[:40]) from None
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                yield from self._read_exactly(size, bufsize)
                self.rfile.readline(1024)  # CRLF after the chunk data
        else:
            yield from self._read_exactly(int(self.headers.get("Content-Length") or 0), bufsize)

    def _read_exactly(self, size, bufsize):
        while size:
            piece = self.rfile.read(min(size, bufsize))
            if not piece:
                raise ConnectionError("request body ended early")
            size -= len(piece)
            yield piece

    def read_body(self):
        return b"".join(self.iter_body())

    def read_form(self):
        """The urlencoded request body as a dict (last value wins)."""
        pairs = urllib.parse.parse_qsl(self.read_body().decode("utf-8"), keep_blank_values=True)
        return dict(pairs)

    # ---- responses ------------------------------------------------------
    def _start(self, status, headers):
        if not self._body_consumed and self.has_body():
            # Unread body bytes would be parsed as the next request: close instead
            # of draining (a rejected upload may be gigabytes).
            self.close_connection = True
            headers = list(headers) + [("Connection", "close")]
        if isinstance(status, tuple):
            self.send_response(*status)
        else:
            self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()

    def send(self, status, body=b"", content_type="text/plain; charset=utf-8", headers=()):
        """Send a complete response; ``status`` may be ``(code, reason)``."""
        if isinstance(body, str):
            body = body.encode("utf-8")
        self._start(status, [("Content-Type", content_type),
                             ("Content-Length", str(len(body)))] + list(headers))
        if body and self.command != "HEAD":     # nothing to write: a client that
            self.wfile.write(body)              # has closed must not be an error

    def send_json(self, status, obj, headers=()):
        self.send(status, json.dumps(obj), "application/json", headers)

    def start_chunked(self, status, headers=()):
        self._start(status, list(headers) + [("Transfer-Encoding", "chunked")])

    def write_chunk(self, data):
        if data and self.command != "HEAD":
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunked(self):
        if self.command != "HEAD":
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class Listener(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """The listener of every in-process HTTP server of the tests (these
    doubles and tests/faultserver.py): a daemon thread per connection, no
    reverse DNS lookup when binding, the open connections kept so that
    ``drop_connections()`` can cut them when the server stops, and errors
    inside handlers handed to *on_error* (a traceback text) when given.
    (ThreadingMixIn + HTTPServer rather than ThreadingHTTPServer, which
    Python 3.6 lacks.)"""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address, handler_class, on_error=None):
        self.on_error = on_error
        self._connections = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler_class)

    def server_bind(self):
        # HTTPServer.server_bind calls socket.getfqdn(), slow without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address):
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self):
        with self._connections_lock:
            connections = list(self._connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        if self.on_error is None:
            super().handle_error(request, client_address)
        else:
            self.on_error(traceback.format_exc())


class _Server(Listener):
    def __init__(self, handler_class, double):
        self.double = double
        super().__init__(("127.0.0.1", 0), handler_class)


class ServerDouble:
    """start()/stop() and context-manager life cycle; ``url`` is set by start()."""

    handler_class = DoubleHandler

    def __init__(self):
        self._httpd = None
        self._thread = None
        self.url = None
        self.port = None

    def start(self):
        self._httpd = _Server(self.handler_class, self)
        self.port = self._httpd.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop serving and cut open keep-alive connections."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.drop_connections()
        self._httpd.server_close()
        self._thread.join(5)
        self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
