"""A small authoritative DNS server for tests, on 127.0.0.1 (UDP and TCP on the same free port).

The test owns its records and TTLs and changes them while the server runs; the server counts the
queries it receives per name and per (name, type), and can be told to stop answering (a resolver
outage: queries time out), to answer SERVFAIL, or to hold its answers until a gate opens (to show
that a caller did not wait on a query).

    async with DNSServer() as dns:
        dns.set("plane.test", "A", "10.0.0.1", ttl=5)
        resolver = Resolver((dns.address,))

Every name is treated as part of one zone: a name with no records at all gets NXDOMAIN, a name with
records of other types gets an empty NOERROR answer (NODATA); both carry the zone's SOA in the
authority section, whose MINIMUM (`negative_ttl`) is the RFC 2308 negative TTL.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import Literal

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Mode = Literal["answer", "drop", "servfail"]
Sender = Callable[[bytes], None]


class DNSServer:
    def __init__(self, *, zone: str = "test.", negative_ttl: int = 2) -> None:
        self.zone = dns.name.from_text(zone)
        self.negative_ttl = negative_ttl
        self.records: dict[tuple[dns.name.Name, int], tuple[int, tuple[str, ...]]] = {}
        self.mode: Mode = "answer"
        self.gate: asyncio.Event | None = None  # when set to an Event, answers wait until it is set
        self.queries: collections.Counter[str] = collections.Counter()  # by name ("plane.test")
        self.queries_by_type: collections.Counter[tuple[str, str]] = collections.Counter()  # ("plane.test", "A")
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._pending: set[asyncio.Task[None]] = set()

    # -- records ------------------------------------------------------------------------------------

    def set(self, name: str, rdtype: str, *values: str, ttl: int = 60) -> None:
        """Replace the `rdtype` records of `name` (values in zone-file text: "10.0.0.1", "10 5 8000 a.test.")."""
        self.records[(_name(name), dns.rdatatype.from_text(rdtype))] = (ttl, values)

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Remove one type of records of `name`, or all of them (the name then gets NXDOMAIN)."""
        qname = _name(name)
        for key in [k for k in self.records if k[0] == qname]:
            if rdtype is None or key[1] == dns.rdatatype.from_text(rdtype):
                del self.records[key]

    def hold(self) -> asyncio.Event:
        """Hold every answer until the returned event is set."""
        self.gate = asyncio.Event()
        return self.gate

    @property
    def address(self) -> str:
        """The nameserver as the resolver takes it: "127.0.0.1:<port>"."""
        return f"127.0.0.1:{self.port}"

    @property
    def total_queries(self) -> int:
        return sum(self.queries.values())

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> DNSServer:
        loop = asyncio.get_running_loop()
        for _ in range(50):  # UDP on a free port, then TCP on the same number (rarely taken: retry)
            self._udp, _ = await loop.create_datagram_endpoint(lambda: _UDP(self), local_addr=("127.0.0.1", 0))
            self.port = self._udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, "127.0.0.1", self.port, family=socket.AF_INET)
                return self
            except OSError:
                self._udp.close()
        raise RuntimeError("no free port for UDP and TCP together")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)

    async def __aenter__(self) -> DNSServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- answering ----------------------------------------------------------------------------------

    def answer(self, wire: bytes, *, udp: bool) -> bytes | None:
        """The response to one query in wire form, or None to stay silent (mode "drop", unparsable).

        Over UDP an answer larger than the client's EDNS payload (512 bytes without EDNS) is sent
        truncated with TC set (RFC 1035 §4.2.1), so the client retries over TCP.
        """
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:  # garbage is ignored, as a real server would
            return None
        if not query.question:
            return None
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        self.queries[name] += 1
        self.queries_by_type[(name, dns.rdatatype.to_text(question.rdtype))] += 1
        if self.mode == "drop":
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        qname = question.name.canonicalize()
        found = self.records.get((qname, question.rdtype))
        if found is not None:
            ttl, values = found
            response.answer.append(dns.rrset.from_text_list(qname, ttl, dns.rdataclass.IN, question.rdtype, values))
        else:
            if not any(key[0] == qname for key in self.records):
                response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa(qname))
        limit = (query.payload if query.edns >= 0 else 512) if udp else 65535
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC
            return truncated.to_wire()

    def _soa(self, qname: dns.name.Name) -> dns.rrset.RRset:
        owner = self.zone if qname.is_subdomain(self.zone) else dns.name.root
        text = f"ns.{self.zone} admin.{self.zone} 1 60 60 60 {self.negative_ttl}"
        return dns.rrset.from_text(owner, self.negative_ttl, dns.rdataclass.IN, dns.rdatatype.SOA, text)

    async def reply(self, wire: bytes, send: Sender, udp: bool) -> None:
        response = self.answer(wire, udp=udp)
        if response is None:
            return
        if self.gate is not None:
            await self.gate.wait()
        send(response)

    def spawn(self, wire: bytes, send: Sender, *, udp: bool) -> None:
        if self.gate is None:
            response = self.answer(wire, udp=udp)  # answer at once, in order (the common case)
            if response is not None:
                send(response)
            return
        task = asyncio.get_running_loop().create_task(self.reply(wire, send, udp))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(response: bytes) -> None:
            if not writer.is_closing():
                writer.write(struct.pack("!H", len(response)) + response)

        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                self.spawn(await reader.readexactly(length), send, udp=False)
        writer.close()


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        transport = self.transport

        def send(response: bytes) -> None:
            if transport is not None and not transport.is_closing():
                transport.sendto(response, addr)

        self.server.spawn(data, send, udp=True)


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text).canonicalize()
