"""User-space WAN link emulator: a TCP proxy that imposes bandwidth, latency, jitter and loss.

The kernel here has no ``netem``, so every byte between a site and the coordinator goes through a
:class:`LinkProxy`: a client connects to the proxy's listening port, the proxy connects to the
target, and copies bytes both ways through an emulated link. ``forward`` is client -> target
("up"), ``backward`` is target -> client ("down"); each direction has its own :class:`LinkParams`.

The model of one direction (bottleneck, latency and jitter with in-order delivery, loss as TCP
feels it, backpressure, blackholes, live changes) and its assumptions are described in
geotrain.wan.shaping.

Modules: geotrain.wan.shaping (the model above: :class:`LinkParams`, one direction's state),
geotrain.wan.proxy (:class:`LinkProxy`, the threads that move the bytes) and this one, whose
``main`` is the process entry point of ``geotrain link`` (one process per WAN link). Every
name other code imports from here stays importable from here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from contextlib import suppress
from dataclasses import replace

from geotrain.errors import LinkError
from geotrain.units import parse_bandwidth_mbps, parse_duration_ms
from geotrain.wan.proxy import LinkProxy
from geotrain.wan.shaping import DIRECTIONS, MIN_RTT_S, MSS, LinkParams, coerce_changes
from geotrain.wan.stripe import MAX_STREAMS, Joiner, Splitter

__all__ = ["MIN_RTT_S", "MSS", "LinkParams", "LinkProxy", "main"]

log = logging.getLogger(__name__)


# -- process entry point ---------------------------------------------------------------------

def _hostport(value: str, allow_zero: bool) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        n = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a numeric port, got {value!r}") from None
    if not (0 if allow_zero else 1) <= n <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {value!r}")
    return host, n


def _write_stats(proxy: LinkProxy, path: str, outer: dict | None = None) -> None:
    """``outer``: what the link is to its users when the proxy sits between a stripe splitter and joiner
    (its listen and target addresses, its streams); ``connections`` then count the stripes (TCP flows)."""
    data = proxy.stats()
    data.update(outer or {})
    data.update(pid=os.getpid(), time=time.time())
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # `--stats-file DIR/links/x.json`
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("link %s: cannot write stats to %s: %s", proxy.name, path, exc)


def _apply_control(proxy: LinkProxy, text: str | None) -> None:
    """Apply a control document: {"forward": {...}|null, "backward": {...}|null}.

    A dict gives fields over the construction params of that direction; null/absent (or a
    deleted file) means the construction params.
    """
    doc = {} if text is None else json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("the control file must hold a JSON object")
    new = {}
    for d in DIRECTIONS:
        spec = doc.get(d)
        if spec is not None and not isinstance(spec, dict):
            raise ValueError(f"control file: {d!r} must be an object or null")
        new[d] = replace(proxy.initial_params(d), **coerce_changes(spec)) if spec else proxy.initial_params(d)
    for d in DIRECTIONS:
        proxy.set_params(d, new[d])


def main(argv: list[str] | None = None) -> int:
    """``geotrain link``: run one link until SIGTERM/SIGINT. Prints ``READY <port>`` once listening."""
    ap = argparse.ArgumentParser(prog="geotrain link", description="Emulate one WAN link as a TCP proxy.")
    ap.add_argument("--name", default="link")
    ap.add_argument("--listen", default="127.0.0.1:0", type=lambda v: _hostport(v, True),
                    help="HOST:PORT, port 0 = any")
    ap.add_argument("--target", required=True, type=lambda v: _hostport(v, False), help="HOST:PORT")
    ap.add_argument("--bandwidth", required=True, help='e.g. "100mbit" (forward, and backward unless --down-*)')
    ap.add_argument("--latency", default="0ms", help='one-way, e.g. "50ms"')
    ap.add_argument("--jitter", default="0ms")
    ap.add_argument("--loss", type=float, default=0.0, help="segment loss probability, e.g. 0.001")
    ap.add_argument("--down-bandwidth")
    ap.add_argument("--down-latency")
    ap.add_argument("--down-jitter")
    ap.add_argument("--down-loss", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats-file")
    ap.add_argument("--control-file", help='JSON {"forward": {fields}|null, "backward": ...}, polled every 0.2 s')
    ap.add_argument("--streams", type=int, default=1,
                    help="stripe each connection over this many TCP flows through the emulated link "
                         "(geotrain.wan.stripe; the loss bound is per flow); default 1")
    ap.add_argument("--log-level", default=os.environ.get("GEOTRAIN_LOG_LEVEL", "WARNING"))
    args = ap.parse_args(argv)
    if not 1 <= args.streams <= MAX_STREAMS:
        ap.error(f"--streams must be 1..{MAX_STREAMS}, got {args.streams}")
    try:
        fwd = LinkParams(parse_bandwidth_mbps(args.bandwidth), parse_duration_ms(args.latency),
                         parse_duration_ms(args.jitter), args.loss)
        bwd = LinkParams(
            parse_bandwidth_mbps(args.down_bandwidth) if args.down_bandwidth is not None else fwd.bandwidth_mbps,
            parse_duration_ms(args.down_latency) if args.down_latency is not None else fwd.latency_ms,
            parse_duration_ms(args.down_jitter) if args.down_jitter is not None else fwd.jitter_ms,
            args.down_loss if args.down_loss is not None else fwd.loss)
    except ValueError as exc:
        ap.error(str(exc))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stop = threading.Event()
    previous: dict[int, object] = {}

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            # A SIGINT ignored on purpose (geotrain.run.procs: the launcher decides) stays ignored.
            if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                continue
            previous[sig] = signal.signal(sig, on_signal)
    except ValueError:  # not the main thread: no signal handling
        pass

    outer = {"streams": args.streams}
    ends: list = []  # --streams > 1: the stripes' two ends, at the link's two ends
    if args.streams > 1:
        joiner = Joiner(args.name, ("127.0.0.1", 0), args.target)
        ends.append(joiner)
        proxy = LinkProxy(args.name, ("127.0.0.1", 0), fwd, bwd, listen=("127.0.0.1", 0), seed=args.seed)
    else:
        proxy = LinkProxy(args.name, args.target, fwd, bwd, listen=args.listen, seed=args.seed)
    try:
        try:
            if ends:
                proxy.target = ("127.0.0.1", joiner.start())
                splitter = Splitter(args.name, args.listen, ("127.0.0.1", proxy.start()), args.streams)
                ends.append(splitter)
                port = splitter.start()
            else:
                port = proxy.start()
        except LinkError as exc:
            print(f"geotrain link: {exc}", file=sys.stderr, flush=True)
            return 1
        if ends:
            outer.update(listen=f"{args.listen[0]}:{port}", target=f"{args.target[0]}:{args.target[1]}")
        if args.stats_file:
            _write_stats(proxy, args.stats_file, outer)
        print(f"READY {port}", flush=True)
        last_control: str | None = None
        _nothing = object()  # a control text never seen (None means: no control file, i.e. restore)
        bad_control: object = _nothing
        next_stats = time.monotonic() + 0.5
        while True:
            if args.control_file:
                try:
                    with open(args.control_file) as f:
                        text: str | None = f.read()
                except FileNotFoundError:
                    text = None
                except OSError as exc:
                    log.warning("link %s: cannot read control file %s: %s", args.name, args.control_file, exc)
                    text = last_control
                if text != last_control and text != bad_control:
                    try:
                        _apply_control(proxy, text)
                        last_control, bad_control = text, _nothing
                    except (ValueError, TypeError) as exc:
                        bad_control = text
                        log.warning("link %s: ignoring control file %s: %s", args.name, args.control_file, exc)
            if args.stats_file and time.monotonic() >= next_stats:
                _write_stats(proxy, args.stats_file, outer)
                next_stats = time.monotonic() + 0.5
            if stop.wait(0.2):
                break
    finally:
        for end in reversed(ends):
            end.stop()
        proxy.stop()
        if args.stats_file:
            _write_stats(proxy, args.stats_file, outer)
        for sig, handler in previous.items():
            with suppress(ValueError, TypeError):
                signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
