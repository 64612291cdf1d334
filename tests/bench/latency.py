#!/usr/bin/env python3
"""A TCP proxy on 127.0.0.1 that makes a loopback server look far away.

This kernel has no netem, so the WAN is emulated in user space:

* every byte is held back RTT/2 on its way in each direction (a request and
  its answer cost one RTT);
* a new connection costs one more RTT (the TCP handshake): the client's
  first bytes leave only RTT after it connected;
* ``--window`` (MiB, default unlimited) bounds the bytes in flight per
  connection and direction, as a TCP window does: a byte counts from when
  it is read until RTT later (delivered after RTT/2, "acknowledged" after
  another RTT/2), so one connection carries at most WINDOW/RTT;
* ``--rate`` (MiB/s, default unlimited) caps each connection and direction.

TLS passes through untouched (its handshake pays its round trips like any
other bytes).  Slow start and loss are not emulated.

    python3 tests/bench/latency.py --to 127.0.0.1:8080 --rtt 20 [--window 4] [--rate 100]

prints ``listening 127.0.0.1:PORT`` once it accepts connections and runs until
killed.  Only loopback addresses are accepted on either side.
"""

import argparse
import asyncio
import collections
import ipaddress
import signal
import socket
import sys

LOOPBACK = "127.0.0.1"


class Half:
    """One direction of one proxied connection: bytes read from one transport
    are written to the other one ``delay`` seconds later, in order."""

    def __init__(self, loop, delay, window, rate):
        self.loop = loop
        self.delay = delay
        self.window = window
        self.rate = rate
        self.q = collections.deque()  # (due, bytes | "eof" | "close")
        self.timer = None
        self.inflight = 0
        self.busy_until = 0.0
        self.src = self.dst = None
        self.src_paused = False
        self.dst_full = False
        self.done = False

    def feed(self, item):
        now = self.loop.time()
        if self.rate and isinstance(item, bytes):
            start = max(now, self.busy_until)
            self.busy_until = start + len(item) / self.rate
            due = self.busy_until + self.delay
        else:
            due = max(now, self.busy_until) + self.delay
        self.q.append((due, item))
        if self.window and isinstance(item, bytes):
            self.inflight += len(item)
            self.loop.call_at(due + self.delay, self._ack, len(item))
        self._arm()
        self.flow()

    def _ack(self, n):
        self.inflight -= n
        self.flow()

    def flow(self):
        """Pause reading the source while the window is full or the
        destination cannot take more; resume when both clear."""
        if self.src is None or self.done:
            return
        pause = self.dst_full or (self.window and self.inflight >= self.window)
        if pause and not self.src_paused:
            self.src_paused = True
            try:
                self.src.pause_reading()
            except (RuntimeError, AttributeError):
                pass
        elif not pause and self.src_paused:
            self.src_paused = False
            try:
                self.src.resume_reading()
            except (RuntimeError, AttributeError):
                pass

    def _arm(self):
        if self.timer is None and self.q:
            self.timer = self.loop.call_at(self.q[0][0], self._deliver)

    def _deliver(self):
        self.timer = None
        now = self.loop.time()
        while self.q and self.q[0][0] <= now + 0.0002:
            dst = self.dst
            if dst is None:
                # not connected to the server yet (Python 3.6 reads the client
                # although reading was paused in connection_made): made() resumes
                return
            _, item = self.q.popleft()
            if dst.is_closing():
                continue
            if item == "eof":
                if dst.can_write_eof():
                    dst.write_eof()
                else:
                    dst.close()
            elif item == "close":
                dst.close()
            else:
                dst.write(item)
        self._arm()


class Side(asyncio.Protocol):
    """The protocol of one of the two sockets of a proxied connection."""

    def __init__(self, link, which):
        self.link = link
        self.which = which  # "client" or "server"

    def connection_made(self, transport):
        self.link.made(self.which, transport)

    def data_received(self, data):
        self.link.outgoing(self.which).feed(data)

    def eof_received(self):
        self.link.outgoing(self.which).feed("eof")
        return True  # half-close: the other direction goes on

    def connection_lost(self, exc):
        self.link.lost(self.which)

    def pause_writing(self):
        half = self.link.incoming(self.which)
        half.dst_full = True
        half.flow()

    def resume_writing(self):
        half = self.link.incoming(self.which)
        half.dst_full = False
        half.flow()


class Link:
    """One client connection and its connection to the target."""

    def __init__(self, proxy):
        self.proxy = proxy
        loop, d, w, r = proxy.loop, proxy.rtt / 2.0, proxy.window, proxy.rate
        self.up = Half(loop, d, w, r)  # client -> server
        self.down = Half(loop, d, w, r)  # server -> client
        self.client = self.server = None
        self.closed = set()

    def outgoing(self, which):
        return self.up if which == "client" else self.down

    def incoming(self, which):
        return self.down if which == "client" else self.up

    def made(self, which, transport):
        if which == "client":
            self.client = transport
            transport.pause_reading()  # until the emulated handshake is over
            self.up.src, self.down.dst = transport, transport
            self.proxy.loop.call_later(self.proxy.rtt, self._connect)
        else:
            self.server = transport
            self.up.dst, self.down.src = transport, transport
            self.client.resume_reading()
            self.up._arm()  # what the client sent meanwhile (see Half._deliver)

    def _connect(self):
        if self.client.is_closing():
            return
        coro = self.proxy.loop.create_connection(lambda: Side(self, "server"), *self.proxy.target)
        task = asyncio.ensure_future(coro)

        def done(t):
            if t.cancelled() or t.exception() is not None:
                self.client.close()
        task.add_done_callback(done)

    def lost(self, which):
        if which in self.closed:
            return
        self.closed.add(which)
        half = self.outgoing(which)
        half.done = True
        half.feed("close")  # after whatever it still has to deliver


class Proxy:
    def __init__(self, target, rtt, window=None, rate=None):
        self.target = target
        self.rtt = rtt
        self.window = window
        self.rate = rate
        self.loop = None

    async def serve(self, port, on_ready):
        self.loop = asyncio.get_event_loop()
        server = await self.loop.create_server(lambda: Side(Link(self), "client"), LOOPBACK, port,
                                               reuse_address=True, backlog=1024)
        sock = server.sockets[0]
        on_ready(sock.getsockname()[1])
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()


def loopback_target(text):
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or LOOPBACK
    if not ipaddress.ip_address(socket.gethostbyname(host) if host == "localhost" else host).is_loopback:
        raise argparse.ArgumentTypeError("only loopback targets: %s" % text)
    return host, int(port)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--to", type=loopback_target, required=True, help="HOST:PORT on loopback")
    ap.add_argument("--port", type=int, default=0, help="port to listen on (default: any free one)")
    ap.add_argument("--rtt", type=float, required=True, help="round-trip time to emulate, ms")
    ap.add_argument("--window", type=float, default=None,
                    help="MiB in flight per connection and direction (default: unlimited)")
    ap.add_argument("--rate", type=float, default=None,
                    help="MiB/s per connection and direction (default: unlimited)")
    args = ap.parse_args(argv)
    proxy = Proxy(args.to, args.rtt / 1000.0,
                  window=int(args.window * (1 << 20)) if args.window else None,
                  rate=args.rate * (1 << 20) if args.rate else None)

    def ready(port):
        sys.stdout.write("listening %s:%d\n" % (LOOPBACK, port))
        sys.stdout.flush()

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(proxy.serve(args.port, ready))
    finally:
        loop.close()


if __name__ == "__main__":
    main()
