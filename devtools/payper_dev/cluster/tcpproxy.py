"""A TCP forwarder: the real node's pods reach the API server through it.

The API server listens on loopback only, which no pod can reach. The real node runs this
on its bridge address (198.18.0.1, same port as the API server) and points the
``kubernetes`` Service's EndpointSlice at it, so in-cluster clients (the operator, the
gateway, the agent) reach the API server at ``kubernetes.default.svc`` as in any
cluster: TLS passes through untouched (the serving certificate names the Service IP).

``python -m payper_dev.cluster.tcpproxy --listen 198.18.0.1:6443 --to 127.0.0.1:6443``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()


async def _serve(listen: tuple[str, int], target: tuple[str, int]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()

    server = await asyncio.start_server(handle, *listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tcpproxy", description=__doc__)
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT")
    parser.add_argument("--to", type=_address, required=True, help="HOST:PORT")
    parser.add_argument("--owner", default="", help="who started it (for process lookups)")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.listen, args.to))
    return 0


if __name__ == "__main__":
    sys.exit(main())
