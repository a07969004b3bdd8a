"""A small HTTP/1.1 server for scrapes: one event-loop thread, a bounded pool of workers.

Why not http.server: it takes a thread per connection with no header timeout (500 slowloris
connections made 500 threads), listens with a backlog of 5, speaks HTTP/1.0 only and prints a
traceback for every client that hangs up early. Here one asyncio thread accepts and reads
requests, so an open connection costs a few hundred bytes, not a thread; every connection has a
deadline for its request header, for idling between keep-alive requests and for a client that
stops reading our reply. Complete requests go to a fixed pool of worker threads, which run
the application off the event loop; basic auth is checked first, on the loop from a cache or
on its own bounded bcrypt lane (carbond.web.auth), so failed logins never hold a worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import resource
import socket
import ssl
import threading
from dataclasses import dataclass

from carbond.web.auth import BasicAuth
from carbond.web.config import WebConfig, WebConfigWatcher
from carbond.web.http1 import (
    HEAD_END,
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    METHODS,
    PLAIN,
    App,
    BadRequest,
    Request,
    Response,
    accepts_gzip,
    busy,
    error_response,
    parse_head,
    render_head,
    request_line,
    unauthorized,
    wants_keep_alive,
)

# Re-exported: the HTTP app and tests take the wire types from the server they run on.
__all__ = ["App", "HttpServer", "Request", "Response", "accepts_gzip", "listen"]

log = logging.getLogger(__name__)


def listen(host: str, port: int, family: socket.AddressFamily, backlog: int) -> socket.socket:
    """A bound, listening socket (SO_REUSEADDR, not SO_REUSEPORT: a port in use is an error)."""
    return socket.create_server((host, port), family=family, backlog=backlog)


def default_max_connections() -> int:
    """Below the open-file limit, leaving room for the daemon's own files."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(16, min(1024, soft - 128))


def _with_headers(response: Response, config: WebConfig | None) -> Response:
    if config is None or not config.headers:
        return response
    return dataclasses.replace(response, headers=response.headers + config.headers)


@dataclass
class _Limits:
    header_seconds: float
    idle_seconds: float
    write_seconds: float
    max_connections: int


class _Connection(asyncio.Protocol):
    """One client connection: read a request, hand it to a worker, write the reply, repeat."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = server.loop
        self._limits = server.limits
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._busy = False  # a request is with a worker
        self._ready = False  # TLS, where configured, is up
        self._writing_paused = False
        self._reading_paused = False
        self._closed = False  # no further requests: closing or closed
        self._lost = False  # asyncio says the connection is gone
        self._eof = False  # the client will send no more
        self._served = 0
        self.peer = ""

    # -- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        self._server.connection_opened(self)
        if self._closed:  # no room: every other connection is being served
            return
        self._deadline(self._limits.header_seconds, "no complete request header")
        config = self._server.config_now()
        if config is not None and config.tls is not None:
            transport.pause_reading()
            self._server.spawn(self._start_tls(config))
        else:
            self._ready = True

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        if not self._buffer and not self._busy and self._served and self._timer is not None:
            # The first byte of the next keep-alive request: idle time is over, and the
            # whole header must now arrive within the header timeout.
            self._deadline(self._limits.header_seconds, "no complete request header")
        self._buffer += data
        if self._busy or self._writing_paused:
            if len(self._buffer) > MAX_HEADER_BYTES + MAX_BODY_BYTES:
                self._pause_reading()
            return
        self._next_request()

    def eof_received(self) -> bool | None:
        """A client that half-closes after its request still gets the reply."""
        self._eof = True
        if not self._busy:
            self._next_request()
        tls = self._transport is not None and self._transport.get_extra_info("sslcontext")
        return self._busy and not tls  # keep our side open for the reply coming

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed and (exc is not None or self._busy or self._buffer):
            log.debug("client %s went away%s", self.peer, f": {exc}" if exc else "")
        self._closed = self._lost = True
        self._cancel_timers()
        self._server.connection_closed(self)

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._write_timer is None:
            self._write_timer = self._loop.call_later(
                self._limits.write_seconds, self._give_up, "client stopped reading the reply")

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        if not self._busy and not self._closed:
            self._resume_reading()
            self._next_request()

    # -- our own -----------------------------------------------------------------------------

    @property
    def waiting(self) -> bool:
        """Not being served: may be closed to make room for a new connection."""
        return not self._busy

    async def _start_tls(self, config: WebConfig) -> None:
        transport = self._transport
        assert transport is not None and config.tls is not None
        try:
            upgraded = await self._loop.start_tls(
                transport, self, config.tls, server_side=True,
                ssl_handshake_timeout=self._limits.header_seconds,
            )
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            log.debug("TLS handshake with %s failed: %s", self.peer, exc)
            self._closed = True
            transport.abort()
            return
        if upgraded is None or self._closed:
            return
        assert isinstance(upgraded, asyncio.Transport)
        self._transport = upgraded
        if config.allowed_sans and not config.allows_peer(upgraded.get_extra_info("peercert")):
            self._give_up("client certificate not in client_allowed_sans")
            return
        self._ready = True
        if self._buffer:
            self._next_request()

    def _deadline(self, seconds: float, why: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(seconds, self._expire, why)

    def _expire(self, why: str) -> None:
        self._timer = None
        if not self._busy:
            self._give_up(why)

    def _give_up(self, why: str) -> None:
        if not self._lost:
            log.debug("closing connection from %s: %s", self.peer, why)
            self._abort()

    def _abort(self) -> None:
        self._closed = True
        self._cancel_timers()
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        self._abort()

    def _cancel_timers(self) -> None:
        for timer in (self._timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._write_timer = None

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            with contextlib.suppress(RuntimeError):
                self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None and not self._closed:
            self._reading_paused = False
            with contextlib.suppress(RuntimeError):
                self._transport.resume_reading()

    def _next_request(self) -> None:
        if self._busy or self._closed or not self._ready or not self._buffer:
            return
        found = HEAD_END.search(self._buffer, 0, MAX_HEADER_BYTES + 4)
        if found is None:
            line_end = self._buffer.find(b"\n", 0, MAX_HEADER_BYTES)
            if line_end >= 0:  # the request line is complete: refuse a bad one at once
                try:
                    request_line(bytes(self._buffer[:line_end]).decode("latin-1")
                                 .removesuffix("\r"))
                except BadRequest as exc:
                    self._reply_error(exc.status, str(exc))
                    return
            if len(self._buffer) > MAX_HEADER_BYTES:
                self._reply_error(431, "request header too large")
            return
        end = found.start()
        if end > MAX_HEADER_BYTES:
            self._reply_error(431, "request header too large")
            return
        try:
            request, body_bytes = parse_head(bytes(self._buffer[:end]), self.peer)
        except BadRequest as exc:
            self._reply_error(exc.status, str(exc))
            return
        needed = found.end() + body_bytes
        if len(self._buffer) < needed:
            return  # the (ignored) body is still coming, under the header deadline
        del self._buffer[:needed]
        self._busy = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pause_reading()
        future = self._server.submit(request)
        future.add_done_callback(lambda done: self._respond(request, done))

    def _respond(self, request: Request, done: asyncio.Future[Response]) -> None:
        self._busy = False
        if self._closed or done.cancelled():
            return
        error = done.exception()
        if error is not None:  # the worker wrapper answers 500 itself; this is the pool failing
            log.error("request %s %s from %s failed: %s", request.method, request.path,
                      self.peer, error)
            response = error_response(500)
        else:
            response = done.result()
        keep_alive = wants_keep_alive(request) and not (self._server.stopping or self._eof)
        self._write(response, keep_alive=keep_alive, head_only=request.method == "HEAD")
        self._served += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s %s %s -> %d", self.peer, request.method, request.target,
                      request.version, response.status)
        if not keep_alive or self._closed:
            return
        self._resume_reading()
        if self._buffer:
            self._deadline(self._limits.header_seconds, "no complete request header")
            if not self._writing_paused:
                self._next_request()
        else:
            self._deadline(self._limits.idle_seconds, "idle")

    def _write(self, response: Response, *, keep_alive: bool, head_only: bool = False) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        head = render_head(response, keep_alive=keep_alive, length=len(response.body))
        transport.write(head if head_only else head + response.body)
        if not keep_alive:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            transport.close()  # after the buffered reply is sent; the write timer still runs

    def _reply_error(self, status: int, why: str) -> None:
        log.debug("bad request from %s: %s", self.peer, why)
        self._write(error_response(status, why), keep_alive=False)


class HttpServer:
    """Serves `app` on a listening socket until `stop()`.

    Every reply, 500 included, comes from here: an exception in the application is logged
    with its traceback and answered 500; the worker goes on. Requests are authenticated (basic
    auth) and connections encrypted (TLS) as the web config says at that moment.
    """

    def __init__(
        self,
        sock: socket.socket,
        app: App,
        *,
        web_config: WebConfigWatcher | None = None,
        workers: int = 4,
        backlog: int = 1024,
        header_timeout_seconds: float = 10.0,
        idle_timeout_seconds: float = 120.0,
        write_timeout_seconds: float = 30.0,
        max_connections: int | None = None,
    ) -> None:
        self.sock = sock
        self.port = int(sock.getsockname()[1])
        self.app = app
        self.web_config = web_config
        self.auth = BasicAuth()
        self.backlog = backlog
        self.limits = _Limits(
            header_timeout_seconds, idle_timeout_seconds, write_timeout_seconds,
            max_connections or default_max_connections(),
        )
        self.stopping = False
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._on_loop_error)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="carbond-http-worker")
        self._connections: dict[_Connection, None] = {}  # insertion order: oldest first
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, name="carbond-http", daemon=True)
        self._started = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._started.wait(5.0)

    def stop(self) -> None:
        """Close the listener and every connection; return within about a second."""
        if self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
                future.result(timeout=1.0)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=1.0)
        self._pool.shutdown(wait=not self._thread.is_alive(), cancel_futures=True)
        self.auth.close()
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()
        self.sock.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self._server = self.loop.run_until_complete(self.loop.create_server(
                lambda: _Connection(self), sock=self.sock, backlog=self.backlog))
            self._started.set()
            self.loop.run_forever()
        except Exception:
            log.exception("the HTTP server stopped")
        finally:
            self._started.set()

    async def _shutdown(self) -> None:
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- for connections ---------------------------------------------------------------------

    def config_now(self) -> WebConfig | None:
        return self.web_config.current() if self.web_config is not None else None

    def connection_opened(self, connection: _Connection) -> None:
        self._connections[connection] = None
        if len(self._connections) <= self.limits.max_connections:
            return
        # Full: the oldest connection that is not being served makes room (a slowloris
        # client, most likely); a new client is only refused when every slot is busy.
        for other in self._connections:
            if other.waiting:
                log.debug("too many connections: closing the oldest waiting one, %s",
                          other.peer)
                other.close()
                self._connections.pop(other, None)
                return

    def connection_closed(self, connection: _Connection) -> None:
        self._connections.pop(connection, None)

    def spawn(self, coroutine: object) -> None:
        task = self.loop.create_task(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def submit(self, request: Request) -> asyncio.Future[Response]:
        """The response to come; basic auth decided here, on the loop, before any worker."""
        config = self.config_now()
        if config is None or not config.users:
            return self.loop.run_in_executor(self._pool, self._handle, request, config)
        verdict = self.auth.check(config.users, request.header("authorization"))
        if verdict is True:
            return self.loop.run_in_executor(self._pool, self._handle, request, config)
        if verdict is False or verdict is None:
            answer = self.loop.create_future()
            answer.set_result(_with_headers(unauthorized() if verdict is False else busy(),
                                            config))
            return answer
        task = self.loop.create_task(self._after_check(request, config, verdict))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _after_check(self, request: Request, config: WebConfig,
                           verdict: concurrent.futures.Future[bool]) -> Response:
        if not await asyncio.wrap_future(verdict, loop=self.loop):
            return _with_headers(unauthorized(), config)
        return await self.loop.run_in_executor(self._pool, self._handle, request, config)

    # -- on a worker -------------------------------------------------------------------------

    def _handle(self, request: Request, config: WebConfig | None) -> Response:
        try:
            response = self._answer(request)
        except Exception:
            log.exception("%s %s from %s failed", request.method, request.path, request.peer)
            return error_response(500)
        return _with_headers(response, config)

    def _answer(self, request: Request) -> Response:
        if request.method not in METHODS:
            return Response(405, PLAIN, b"Method Not Allowed\n",
                            headers=(("Allow", ", ".join(METHODS)),))
        return self.app(request)

    # -- the loop's own errors ---------------------------------------------------------------

    @staticmethod
    def _on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        """A client's failure is a debug line; anything else is ours and keeps its traceback."""
        exc = context.get("exception")
        message = context.get("message", "")
        if isinstance(exc, OSError):
            level = logging.WARNING if "out of system resource" in str(message) else logging.DEBUG
            log.log(level, "%s: %s", message, exc)
            return
        log.error("HTTP event loop: %s", message,
                  exc_info=exc if isinstance(exc, BaseException) else None)
