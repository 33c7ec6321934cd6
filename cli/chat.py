"""``agentrun chat``: a conversation with an agent in the terminal, one Converse stream a turn."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

import grpc

from agentrun.v1 import agent_pb2, run_pb2, run_service_pb2, run_service_pb2_grpc
from cli.client import (
    ClientTls,
    Metadata,
    add_connection_args,
    client_tls,
    connect,
    rpc_error_message,
)
from cli.render import MODE_CHOICES, EventRenderer, approval_prompt
from common.background import Background
from common.event_streams import TERMINAL_KINDS

if TYPE_CHECKING:
    from agentrun.v1.run_service_pb2_grpc import RunServiceAsyncStub

PROMPT = "you> "
QUIT_COMMAND = "/quit"
CANCEL_REASON = "cancelled from the chat"
EXIT_INTERRUPTED = 130

ConverseCall = grpc.aio.StreamStreamCall[
    run_service_pb2.ConverseRequest, run_service_pb2.ConverseResponse
]


def add_chat_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Registers ``chat``; the parsed namespace's ``func`` is :func:`run_chat`."""
    parser = subparsers.add_parser(
        "chat",
        help="talk to an agent",
        description=(
            "Talk to an agent: each line you type starts a run in the same conversation. "
            f"End with {QUIT_COMMAND} or end of input; Ctrl-C cancels the current run."
        ),
    )
    parser.add_argument("--agent", required=True, metavar="ID", help="the agent to talk to")
    parser.add_argument(
        "--conversation", metavar="ID", help="continue this conversation instead of a new one"
    )
    parser.add_argument(
        "--mode",
        choices=sorted(MODE_CHOICES),
        help="run in this execution mode instead of the agent's",
    )
    add_connection_args(parser)
    parser.set_defaults(func=run_chat)
    return parser


def run_chat(args: argparse.Namespace) -> int:
    """Runs the chat described by parsed ``chat`` arguments; returns the exit code."""
    mode = MODE_CHOICES[args.mode] if args.mode else agent_pb2.EXECUTION_MODE_UNSPECIFIED
    try:
        return asyncio.run(
            _chat(
                args.target,
                args.api_key,
                args.agent,
                args.conversation or "",
                mode,
                client_tls(args),
            )
        )
    except KeyboardInterrupt:
        # Only reachable where SIGINT cannot be handled by the event loop (not the main thread).
        print(file=sys.stdout, flush=True)
        return EXIT_INTERRUPTED


def parse_approval(answer: str) -> bool | None:
    """True for yes, False for no, None for anything else (ask again)."""
    word = answer.strip().lower()
    if word in ("y", "yes"):
        return True
    if word in ("n", "no"):
        return False
    return None


class Interrupted(Exception):
    """Raised by :meth:`Lines.read` when its stop event is set before a line arrives."""


class Lines:
    """The lines of a text stream, read by a daemon thread so that waiting never blocks the loop.

    A daemon thread rather than the loop's executor: a read blocked on a terminal cannot be
    interrupted, and an executor thread would keep the process alive until Enter is pressed.
    Regular files, pipes and terminals all work, unlike with asyncio pipe transports.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._eof = False
        threading.Thread(target=self._pump, name="agentrun-chat-stdin", daemon=True).start()

    def _pump(self) -> None:
        while True:
            try:
                line: str | None = self._stream.readline() or None
            except (OSError, ValueError):
                line = None
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, line)
            except RuntimeError:
                return  # the loop is closed: nobody is listening any more
            if line is None:
                return

    async def read(self, stop: asyncio.Event) -> str | None:
        """The next line without its line ending; None at end of input.

        Raises Interrupted if ``stop`` is set (or gets set) before a line arrives.
        """
        if self._eof:
            return None
        if stop.is_set():
            raise Interrupted
        get = asyncio.ensure_future(self._queue.get())
        halt = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({get, halt}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            halt.cancel()
            if not get.done():
                get.cancel()
        if get.cancelled() or not get.done():
            raise Interrupted
        line = get.result()
        if line is None:
            self._eof = True
            return None
        return line.rstrip("\r\n")


class _Turn:
    """One run on one Converse stream: serialised writes and Ctrl-C handling."""

    def __init__(
        self, call: ConverseCall, renderer: EventRenderer, out: TextIO, err: TextIO
    ) -> None:
        self.call = call
        self.renderer = renderer
        self.interrupted = asyncio.Event()
        self.abandoned = False
        self.asking = False
        self._out = out
        self._err = err
        self._lock = asyncio.Lock()
        self._tasks = Background()

    async def send(self, request: run_service_pb2.ConverseRequest) -> None:
        async with self._lock:
            await self.call.write(request)

    async def close_writing(self) -> None:
        async with self._lock:
            with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
                await self.call.done_writing()

    def interrupt(self) -> None:
        """First Ctrl-C: ask the server to cancel the run. Second: stop waiting for it."""
        # The approval question leaves its line open for the answer.
        opened = "\n" if self.asking else self.renderer.finish()
        print(opened, end="", file=self._out, flush=True)
        if not self.interrupted.is_set():
            self.interrupted.set()
            print(
                "[cancelling the run — press Ctrl-C again to stop waiting]",
                file=self._err,
                flush=True,
            )
            self._tasks.start(self._send_cancel())
        else:
            self.abandoned = True
            self.call.cancel()

    async def _send_cancel(self) -> None:
        request = run_service_pb2.ConverseRequest(
            cancel=run_service_pb2.ConverseCancel(reason=CANCEL_REASON)
        )
        # If the stream already ended, reading it reports why; nothing to add here.
        with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
            await self.send(request)


class Chat:
    """The chat loop: prompts, turns, approvals and interruptions."""

    def __init__(
        self,
        stub: RunServiceAsyncStub,
        metadata: Metadata,
        agent_id: str,
        conversation_id: str,
        mode: agent_pb2.ExecutionMode.ValueType,
        lines: Lines,
        *,
        echo: bool,
        out: TextIO,
        err: TextIO,
    ) -> None:
        self._stub = stub
        self._metadata = metadata
        self._agent_id = agent_id
        self.conversation_id = conversation_id
        self._mode = mode
        self._lines = lines
        self._echo = echo
        self._out = out
        self._err = err
        self._quit = asyncio.Event()
        self._turn: _Turn | None = None

    def on_interrupt(self) -> None:
        if self._turn is not None:
            self._turn.interrupt()
        else:
            self._quit.set()

    async def run(self) -> int:
        """Prompts for lines until /quit, end of input or Ctrl-C at the prompt."""
        while True:
            self._write(PROMPT)
            try:
                line = await self._lines.read(self._quit)
            except Interrupted:
                self._write("\n")
                return EXIT_INTERRUPTED
            if line is None:
                self._write("\n")
                return 0
            self._echo_input(line)
            text = line.strip()
            if text == QUIT_COMMAND:
                return 0
            if text:
                await self.turn(text)

    async def turn(self, text: str) -> None:
        """Runs one user input to its end, printing its events; errors are printed, not raised."""
        renderer = EventRenderer(interactive=True, announce_start=False)
        call: ConverseCall = self._stub.Converse(None, metadata=self._metadata)
        turn = _Turn(call, renderer, self._out, self._err)
        self._turn = turn
        start = run_service_pb2.StreamRunRequest(
            request_id=str(uuid.uuid4()),
            agent_id=self._agent_id,
            input=text,
            conversation_id=self.conversation_id,
            execution_mode=self._mode,
        )
        ended = False
        try:
            await turn.send(run_service_pb2.ConverseRequest(start=start))
            async for response in call:
                for event in response.events:
                    kind = event.WhichOneof("kind")
                    if kind == "run_started" and not self.conversation_id:
                        self.conversation_id = event.run_started.run.conversation_id
                    self._write(renderer.render(event))
                    if kind == "tool_approval_required":
                        await self._decide(turn, event.tool_approval_required)
                    if kind in TERMINAL_KINDS:
                        ended = True
                        await turn.close_writing()
            if not ended:
                self._error(renderer, "error: the stream ended before the run finished")
        except grpc.aio.AioRpcError as error:
            self._error(renderer, rpc_error_message(error))
        except asyncio.InvalidStateError:
            self._error(renderer, "error: the stream ended before the run finished")
        except asyncio.CancelledError:
            # grpc.aio reports a call cancelled by this process as CancelledError.
            if not turn.abandoned:
                raise
            self._error(renderer, "[stopped waiting; the run may still be going]")
        finally:
            self._turn = None
            if not call.done():
                call.cancel()

    async def _decide(self, turn: _Turn, required: run_pb2.ToolApprovalRequired) -> None:
        """Asks the user about a tool call and sends the decision on the turn's stream."""
        while True:
            turn.asking = True
            try:
                answer = await self._lines.read(turn.interrupted)
            except Interrupted:
                return  # the run is being cancelled; no decision needed
            finally:
                turn.asking = False
            if answer is None:
                self._write("\n")
                self._err_line("no answer (end of input): denying the tool call")
                approved, reason = False, "no answer from the user"
                break
            self._echo_input(answer)
            decision = parse_approval(answer)
            if decision is not None:
                approved, reason = decision, ""
                break
            self._write(approval_prompt(required))
        decision_message = run_service_pb2.ToolApprovalDecision(
            tool_call_id=required.tool_call.id, approved=approved, reason=reason
        )
        await turn.send(run_service_pb2.ConverseRequest(tool_approval=decision_message))

    def _echo_input(self, line: str) -> None:
        # A terminal echoes what is typed; piped input would leave the prompt line open.
        if self._echo:
            self._write(line + "\n")

    def _write(self, text: str) -> None:
        if text:
            print(text, end="", file=self._out, flush=True)

    def _err_line(self, message: str) -> None:
        print(message, file=self._err, flush=True)

    def _error(self, renderer: EventRenderer, message: str) -> None:
        self._write(renderer.finish())
        self._err_line(message)


async def _chat(
    target: str,
    api_key: str | None,
    agent_id: str,
    conversation_id: str,
    mode: agent_pb2.ExecutionMode.ValueType,
    tls: ClientTls | None = None,
) -> int:
    channel, metadata = connect(target, api_key, tls)
    async with channel:
        chat = Chat(
            run_service_pb2_grpc.RunServiceStub(channel),
            metadata,
            agent_id,
            conversation_id,
            mode,
            Lines(sys.stdin),
            echo=not sys.stdin.isatty(),
            out=sys.stdout,
            err=sys.stderr,
        )
        loop = asyncio.get_running_loop()
        handled = _handle_sigint(loop, chat.on_interrupt)
        try:
            code = await chat.run()
        finally:
            if handled:
                loop.remove_signal_handler(signal.SIGINT)
    if chat.conversation_id:
        print(
            f"conversation {chat.conversation_id} (continue with --conversation "
            f"{chat.conversation_id})",
            file=sys.stderr,
            flush=True,
        )
    return code


def _handle_sigint(loop: asyncio.AbstractEventLoop, handler: Callable[[], None]) -> bool:
    """Routes Ctrl-C to ``handler``; False where the loop cannot (Windows, not main thread)."""
    try:
        loop.add_signal_handler(signal.SIGINT, handler)
    except (NotImplementedError, RuntimeError, ValueError):
        return False
    return True
