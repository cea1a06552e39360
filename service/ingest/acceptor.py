"""An asyncio DICOM upper-layer acceptor for C-ECHO and C-STORE (PS3.8 Sections 7 and 9, PS3.7 Section 9).

Why not pynetdicom's server: its association and DUL reactor threads poll with short sleeps, which capped a
do-nothing pynetdicom SCP at ~190 instances/s here against ~650/s for DCMTK ``storescp`` (issue 20); a
connection that sent six bytes held an association slot for ever. Here one event loop reads every
connection; PDUs are decoded by pynetdicom's codecs where they are not on the per-instance path
(:mod:`service.ingest.pdu`, :mod:`service.ingest.negotiation`) and by hand where they are
(:mod:`service.ingest.dimse`). The store call runs on a small thread pool, so the fsyncs of several
associations overlap while the loop keeps reading; but while at most :data:`STORE_ON_LOOP_UP_TO`
associations are open and the store says it would wait for nothing but its own slot's sync
(``store_at_once``), the loop runs it itself (``StoreRequest.on_loop``): it writes the slot while a pool
thread checks the instance (:mod:`service.ingest.scp`), and the two thread hops of a store on the pool (each
waiting for the GIL behind the background placement) are saved: one association ~15 % of its rate
(bench/RESULTS.md, session 17), two 1.12x (session 27). With four, the loop's own writes, one after another,
moved no more than the pool's, side by side (session 27): the pool keeps the loop free for them.

One connection's life (PS3.8 9.2 state machine, acceptor side):

1. accepted: *pending* at the door (:mod:`service.ingest.door`); TLS handshake if configured; ARTIM runs.
2. A-ASSOCIATE-RQ read (capped at ``max_unassociated_pdu`` before its body is read) and decoded; version,
   application context and AE titles checked → A-ASSOCIATE-RJ, or a slot is taken (else RJ "local limit
   exceeded") and the A-ASSOCIATE-AC sent.
3. P-DATA-TF: PDV fragments reassembled per message (a command, then its dataset on the same context); each
   complete C-STORE is handed to ``handle_store`` and answered after it returns (success only once the
   instance is durable: the store decides). PDUs above our advertised maximum abort the association.
4. A-RELEASE-RQ → A-RELEASE-RP, then we wait (ARTIM) for the peer to close; A-ABORT from the peer, a closed
   connection, an idle association (``idle_seconds``) or a protocol error end it at once. An instance whose
   dataset did not arrive whole is never stored.

``on_opened(association)`` is called on the loop when an association is accepted; ``on_end(association,
released)`` exactly once when it is gone, on the store pool (it may touch the database) and after the
association's last store returned, so the open-associations tracker (:mod:`service.ingest.associations`)
always sees an instance before the end of the association that carried it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import Executor

from service.config import DicomSettings
from service.dicom import tls
from service.errors import CommandError, IdleError, MalformedPduError, PduDeadlineError
from service.ingest import pdu
from service.ingest.attempt import STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES
from service.ingest.deadlines import ReadDeadlines
from service.ingest.dimse import C_CANCEL_RQ, C_ECHO_RQ, C_STORE_RQ, Command, decode_command, response
from service.ingest.door import Door, Visitor, spoke_check
from service.ingest.negotiation import Agreement, Negotiator
from service.ingest.reader import PduReader
from service.ingest.requests import (
    Arriving,
    Association,
    EndHandler,
    OpenHandler,
    StoreHandler,
    StoreRequest,
    store_on_pool,
)

__all__ = ["STORE_ON_LOOP_UP_TO", "Acceptor"]

logger = logging.getLogger(__name__)

STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_UNRECOGNIZED_OPERATION = 0x0211
STORE_ON_LOOP_UP_TO = 2
"""Associations open at most for the loop to run a store itself (see the module docstring): alternated
against the pool, two associations moved 1.13x and 1.12x as many instances, four 1.00x and 0.97x
(``bench/ab_ingest.py``, bench/RESULTS.md, session 27); past two, the loop's own writes would be the
queue every association waits in."""
_READ_BUFFER = 256 * 1024  # reader's limit: a DCMTK PDU (128 KiB) fits without pausing the transport


class Acceptor:
    """The listener's event-loop side: ``await start()``, ``await stop()``; everything runs on one loop."""

    def __init__(
        self,
        settings: DicomSettings,
        *,
        tls_context: ssl.SSLContext | None,
        handle_store: StoreHandler,
        on_opened: OpenHandler,
        on_end: EndHandler,
        on_refused: Callable[[int], None],
        executor: Executor,
        store_at_once: Callable[[], bool] = lambda: False,
        on_gone: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.negotiator = Negotiator(settings)
        self.tls_context = tls_context
        self.handle_store = handle_store
        self.on_opened = on_opened
        self.on_refused = on_refused
        self.on_end = on_end
        self.executor = executor
        self.store_at_once = store_at_once
        """Would a store wait for nothing but its own sync (then, with few associations, run here)."""
        self.on_gone = on_gone
        """Called on the loop when a connection is closed, whatever became of it (the process that handed
        it here counts what each of its listener processes serves: :mod:`service.ingest.processes`)."""
        self.door = Door(
            max_associations=settings.max_associations,
            max_pending=settings.max_pending,
            max_pending_per_address=settings.max_pending_per_address,
        )
        # P-DATA limit: our advertised maximum (PS3.8 D.1); "no limit" (0) is still bounded by the dataset cap
        self.pdu_limit = settings.max_pdu or settings.max_dataset_bytes + 16
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Bind and listen; returns the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self.settings.host, self.settings.port, reuse_address=True, backlog=128
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def adopt(self, sock: socket.socket) -> None:
        """Serve a connection another process accepted (:mod:`service.ingest.processes`), from its first
        byte, exactly as one this acceptor accepted itself."""
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self._protocol, sock)
        except OSError as exc:  # gone before it was served (the peer reset it meanwhile)
            logger.info("a handed-over connection could not be served: %s", exc.strerror or exc)
            sock.close()
            self.on_gone()

    def _protocol(self) -> asyncio.StreamReaderProtocol:  # asyncio.start_server's, with our reader
        loop = asyncio.get_running_loop()
        return asyncio.StreamReaderProtocol(PduReader(_READ_BUFFER, loop), self._connection, loop=loop)

    async def stop(self) -> None:
        """Stop accepting; abort open associations (an unanswered instance is sent again by its sender)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # ---- one connection ---------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert isinstance(reader, PduReader)  # made by start()'s protocol factory
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        host, port = writer.get_extra_info("peername")[:2]
        visitor = Visitor(host, port, close=writer.transport.abort, spoke=spoke_check(reader, writer))
        if not self.door.arrive(visitor):
            self._tasks.discard(task)
            writer.transport.abort()
            self.on_gone()
            return
        assoc: Association | None = None
        released = False
        s = self.settings
        deadlines = ReadDeadlines(s.artim_seconds, s.pdu_seconds, s.idle_seconds)
        try:
            assoc = await self._associate(visitor, reader, writer, deadlines)
            if assoc is not None:
                released = await self._serve(assoc, reader, writer, deadlines)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                writer.write(pdu.abort_pdu(2, pdu.ABORT_NOT_SPECIFIED))
            raise
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            logger.info(
                "connection from %s closed in the middle of a PDU (%s)", assoc or visitor, type(exc).__name__
            )
        except OSError as exc:
            logger.info("connection from %s failed: %s", assoc or visitor, exc.strerror or exc)
        finally:
            deadlines.close()
            self.door.leave(visitor)
            writer.transport.abort()
            self._tasks.discard(task)
            self.on_gone()
            if assoc is not None:  # on the store pool: it may touch the database (stop() waits for it)
                asyncio.get_running_loop().run_in_executor(self.executor, self.on_end, assoc, released)

    async def _associate(
        self,
        visitor: Visitor,
        reader: PduReader,
        writer: asyncio.StreamWriter,
        deadlines: ReadDeadlines,
    ) -> Association | None:
        """Steps 1-2 of the module docstring; None when no association came of it (already logged)."""
        s = self.settings
        if self.tls_context and not await tls.handshake(writer, self.tls_context, str(visitor)):
            return None
        try:
            async with asyncio.timeout(s.artim_seconds):
                got = await pdu.read_pdu(
                    reader,
                    limit=s.max_unassociated_pdu,
                    deadlines=deadlines,
                    wait_s=s.artim_seconds,
                    pdu_s=s.pdu_seconds,
                )
        except TimeoutError as exc:  # IdleError, PduDeadlineError or ARTIM itself
            logger.warning(
                "closed the connection from %s: no A-ASSOCIATE-RQ (%s)",
                visitor,
                str(exc) or f"none within {s.artim_seconds:g} s, ARTIM",
            )
            return None
        except MalformedPduError as exc:
            logger.warning("aborted the connection from %s before association: %s", visitor, exc)
            writer.write(pdu.abort_pdu(2, exc.reason))
            return None
        if got is None:
            return None
        pdu_type, view = got
        body = bytes(view)
        if pdu_type != pdu.ASSOCIATE_RQ:
            logger.warning(
                "aborted the connection from %s: %s before any A-ASSOCIATE-RQ",
                visitor,
                pdu.PDU_NAMES.get(pdu_type, f"PDU type 0x{pdu_type:02X}"),
            )
            writer.write(pdu.abort_pdu(2, pdu.ABORT_UNEXPECTED_PDU))
            return None
        try:
            rq = self.negotiator.decode(body)
        except MalformedPduError as exc:
            logger.warning("association from %s rejected: malformed A-ASSOCIATE-RQ: %s", visitor, exc)
            writer.write(pdu.reject_pdu(1, 1, 1))
            return None
        calling, called = rq.calling_ae_title.strip(), rq.called_ae_title.strip()
        rejection = self.negotiator.check(rq, pdu.protocol_version(body))
        if rejection is None and not self.door.associate(visitor):
            rejection = self.negotiator.limit_reached(self.door.in_use)
        if rejection is not None:
            logger.warning(
                "association from %s rejected (calling AE %r, called AE %r): %s",
                visitor,
                calling,
                called,
                rejection.words,
            )
            writer.write(pdu.reject_pdu(rejection.result, rejection.source, rejection.reason))
            await self._linger(reader)
            return None
        agreement: Agreement = self.negotiator.agree(rq, body)
        writer.write(agreement.ac)
        assoc = Association(
            calling, called, visitor.host, visitor.port, agreement.contexts, agreement.peer_max_pdu
        )
        self.on_opened(assoc)
        logger.debug(
            "association %d from %s accepted: %d of %d presentation contexts",
            assoc.id,
            assoc,
            len(agreement.contexts),
            agreement.proposed,
        )
        return assoc

    async def _serve(
        self,
        assoc: Association,
        reader: PduReader,
        writer: asyncio.StreamWriter,
        deadlines: ReadDeadlines,
    ) -> bool:
        """Step 3-4: read PDUs until the association ends; True when it ended by A-RELEASE."""
        s = self.settings
        message: Arriving | None = None
        command_parts: list[memoryview] = []
        try:
            while True:
                got = await pdu.read_pdu(
                    reader,
                    limit=self.pdu_limit,
                    deadlines=deadlines,
                    wait_s=s.idle_seconds,
                    pdu_s=s.pdu_seconds,
                )
                if got is None:
                    logger.info("association %d from %s: connection closed without release", assoc.id, assoc)
                    return False
                pdu_type, body = got
                if pdu_type == pdu.P_DATA_TF:
                    for context_id, control, fragment in pdu.iter_pdvs(body):
                        if context_id not in assoc.contexts:
                            raise MalformedPduError(f"PDV on presentation context {context_id}, not accepted")
                        if control & 0x01:  # command fragment (PS3.8 E.2)
                            if message is not None:
                                raise MalformedPduError(
                                    "a command arrived before the last dataset ended",
                                    pdu.ABORT_UNEXPECTED_PARAMETER,
                                )
                            command_parts.append(fragment)
                            if control & 0x02:
                                command = decode_command(b"".join(command_parts))
                                command_parts = []
                                if command.has_dataset:
                                    few = self.door.in_use <= STORE_ON_LOOP_UP_TO  # stored here?
                                    message = Arriving(command, context_id, checksum=few)
                                else:
                                    await self._answer(assoc, writer, command, context_id, None)
                        else:
                            if message is None or message.context_id != context_id:
                                raise MalformedPduError(
                                    "a dataset fragment without its command", pdu.ABORT_UNEXPECTED_PARAMETER
                                )
                            message.add(fragment, self.settings.max_dataset_bytes)
                            if control & 0x02:
                                await self._answer(assoc, writer, message.command, context_id, message)
                                message = None
                elif pdu_type == pdu.RELEASE_RQ:
                    if message is not None:
                        logger.warning(
                            "association %d from %s released in the middle of a dataset: not stored",
                            assoc.id,
                            assoc,
                        )
                    writer.write(pdu.RELEASE_RP_PDU)
                    await writer.drain()
                    await self._linger(reader)
                    return True
                elif pdu_type == pdu.A_ABORT:
                    logger.info("association %d from %s aborted by the peer", assoc.id, assoc)
                    return False
                else:
                    name = pdu.PDU_NAMES.get(pdu_type)
                    reason = pdu.ABORT_UNEXPECTED_PDU if name else pdu.ABORT_UNRECOGNIZED_PDU
                    raise MalformedPduError(f"unexpected {name or f'PDU type 0x{pdu_type:02X}'}", reason)
        except IdleError as exc:
            logger.info("association %d from %s aborted: %s", assoc.id, assoc, exc)
            writer.write(pdu.abort_pdu(2, pdu.ABORT_NOT_SPECIFIED))
        except (PduDeadlineError, MalformedPduError, CommandError) as exc:
            logger.warning("association %d from %s aborted: %s", assoc.id, assoc, exc)
            writer.write(pdu.abort_pdu(2, getattr(exc, "reason", pdu.ABORT_NOT_SPECIFIED)))
        return False

    async def _answer(
        self,
        assoc: Association,
        writer: asyncio.StreamWriter,
        command: Command,
        context_id: int,
        message: Arriving | None,
    ) -> None:
        """Run the request (C-STORE on the thread pool) and send its response; C-CANCEL gets none."""
        abstract, syntax = assoc.contexts[context_id]
        if command.field == C_CANCEL_RQ:
            return
        if command.field == C_ECHO_RQ:
            status, comment = 0x0000, ""
        elif command.field != C_STORE_RQ or message is None:
            status, comment = STATUS_UNRECOGNIZED_OPERATION, "only C-ECHO and C-STORE are served here"
        elif refusal := self._refusal(command, message, abstract):
            status, comment = refusal
            logger.warning("C-STORE from %s refused: %s", assoc, comment)
            self.on_refused(status)
        else:
            request = StoreRequest(assoc, command, syntax, message.fragments, dataset_crc=message.crc)
            if self.door.in_use <= STORE_ON_LOOP_UP_TO and self.store_at_once():
                request.on_loop = True
                status, comment = self.handle_store(request)  # see the module docstring
            else:
                status, comment = await store_on_pool(self.executor, self.handle_store, request)
        writer.write(pdu.p_data_pdu(context_id, response(command, status, comment)))
        await writer.drain()

    def _refusal(self, command: Command, message: Arriving, abstract: str) -> tuple[int, str] | None:
        """A C-STORE the acceptor answers itself, without the store: ``(status, comment)``, or None."""
        if message.too_large:
            return STATUS_OUT_OF_RESOURCES, f"dataset larger than {self.settings.max_dataset_bytes} bytes"
        if not command.sop_class_uid or not command.sop_instance_uid:
            return STATUS_CANNOT_UNDERSTAND, "affected SOP class or instance UID is not a UID"
        if command.sop_class_uid != abstract:
            return STATUS_SOP_CLASS_NOT_SUPPORTED, "SOP class differs from its presentation context"
        return None

    async def _linger(self, reader: PduReader) -> None:
        """After RJ or RP the requestor closes the connection (PS3.8 9.1.4); wait for that, at most ARTIM."""
        with contextlib.suppress(TimeoutError, OSError, asyncio.IncompleteReadError):
            async with asyncio.timeout(self.settings.artim_seconds):
                while await reader.read(65536):
                    pass
