"""
A live page: the browser's webcam (or a video file it picks) edited as you watch, the
prompt changed as you type, without a cut.

    python live.py                          # http://127.0.0.1:8765, the demo's random weights without weights/
    python live.py --weights weights --prompt "a watercolor painting"

The page (live.html: plain HTML and JavaScript, no build step) captures frames at the
model's size and sends them over a WebSocket; the server runs them through the same
chunk pipeline as sample.py (sample.edit_chunks: encode, mask, DiT, decode) and sends
the edited frames back with each chunk's figures. A prompt typed on the page takes
effect at the next chunk boundary through prompts.ScheduledEditor's KV re-cache; it
is encoded as it arrives, in a thread beside the edit, so the boundary does not wait
for the text encoder.

Bounded everywhere: frames waiting for the GPU sit in a queue of two chunks' worth, and
when they arrive faster than it edits, the oldest are dropped (and counted on the page);
edited frames waiting for a slow page likewise. One client at a time: a second one is
told so in one sentence. A client that leaves mid-chunk stops its edit and frees its state.

The server is aiohttp: HTTP and WebSocket in one small, long-kept library, with limits
on message sizes built in. Messages (JSON unless said):
  page → server  {"type": "prompt", "text": ...}  {"type": "pause"}  {"type": "resume"}
                 binary: one frame, an 8-byte float64 capture time (ms, the page's
                 clock) then width·height·4 bytes of RGBA
  server → page  {"type": "hello", "width", "height", "prompt", "chunk_frames"}
                 {"type": "chunk", "frames", "first_frame", "prompt", "prune_ratio",
                  "chunk_latency_s", "edited_fps", "dropped", "dropped_edited", "gpu_gib",
                  "mask", "mask_shape"}
                 {"type": "error", "message": ...}
                 binary: one edited frame, the capture time of its source then RGBA
"""

import asyncio
import base64
import json
import socket
import struct
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import cli
import lipar
import model as M
import prompts
import sample
import video as io
from cli import EditSettings

PAGE = Path(__file__).with_name("live.html")
HEADER = struct.Struct("<d")  # a frame's capture time, ms


class Session:
    """One client's edit: its frames in, the edit in a thread of its own, its output out.

    send(kind, payload) is called from the edit thread with ("json", dict) or ("frame",
    bytes); it must not block (the server queues and drops). Everything the edit holds
    is released when its thread ends, after stop()."""

    def __init__(self, models, context, settings, send, encode, queue_chunks=2, fusion=None):
        self.models, self.settings, self.send, self.encode, self.fusion = models, settings, send, encode, fusion
        self.fpc = models.dit().cfg.frames_per_chunk
        self.context = context
        size = models.vae().chunk_frames(self.fpc, False)
        self.frames = deque(maxlen=queue_chunks * size)  # (pixels [H, W, 3] uint8, capture ms)
        self.arrived = threading.Condition()
        self.dropped = 0
        self.paused = False
        self.stopped = threading.Event()
        self.prompt = settings.prompt
        self.typed = threading.Lock()
        self.change = None  # (text, future context): the latest prompt typed, for the next boundary
        self.encoding = ThreadPoolExecutor(1, thread_name_prefix="prompt")
        self.chunk_prompts = deque()  # the prompt each edited chunk was edited under, in order
        self.sent = deque(maxlen=32)  # (time, frames) of recent chunks: the edited frames/s
        self.read_at = None  # when the latest piece was taken: a chunk's latency runs from there
        self.thread = threading.Thread(target=self._run, daemon=True)

    # the server's side -------------------------------------------------------

    def push(self, pixels, captured_ms):
        with self.arrived:
            if self.paused:  # paused: nothing is queued, nothing comes out
                self.dropped += 1
                return
            if len(self.frames) == self.frames.maxlen:
                self.dropped += 1  # the oldest waiting frame goes
            self.frames.append((pixels, captured_ms))
            self.arrived.notify()

    def change_prompt(self, text):
        """Encode `text` now, beside the edit. A prompt typed before the boundary replaces
        it, and its encoding is cancelled if not yet started: at most one runs, one waits."""
        with self.typed:
            if self.change is not None:
                self.change[1].cancel()
            self.change = (text, self.encoding.submit(self.encode, text))

    def take_change(self):
        """At a boundary: (text, context) of the latest prompt typed, or None."""
        with self.typed:
            change, self.change = self.change, None
        return None if change is None else (change[0], change[1].result())

    def pause(self, paused):
        with self.arrived:
            self.paused = paused
            if paused:
                self.frames.clear()
            self.arrived.notify()

    def stop(self):
        self.stopped.set()
        with self.arrived:
            self.arrived.notify()

    # the edit's side ---------------------------------------------------------

    def _take(self, count):
        """`count` frames, waiting as long as it takes; None once stopped."""
        taken = []
        with self.arrived:
            while len(taken) < count:
                while not self.frames and not self.stopped.is_set():
                    self.arrived.wait(0.5)
                if self.stopped.is_set():
                    return None
                taken.append(self.frames.popleft())
        return taken

    def _pieces(self, vae, times):
        first = True
        while (taken := self._take(vae.chunk_frames(self.fpc, first))) is not None:
            first = False
            self.read_at = time.perf_counter()
            times.extend(ms for _, ms in taken)
            yield io.to_model(torch.stack([p for p, _ in taken]).to(self.models.device))  # at model size already

    def _run(self):
        try:
            with torch.no_grad(), M.fusion(self.fusion):  # a thread of its own: the fusion is set here
                self._edit()
        except Exception as err:  # the page hears of it; the server keeps serving
            self.send("json", {"type": "error", "message": f"the edit stopped: {err}"})
        finally:
            self.frames.clear()
            self.encoding.shutdown(wait=False, cancel_futures=True)

    def _edit(self):
        vae, dit = self.models.vae(), self.models.dit()
        s = self.settings
        grid = (s.height // 16, s.width // 16)
        editor = prompts.ScheduledEditor(sample.make_editors(self.models, self.context, grid, s)["lipar"], dit, [])
        masks = lipar.MaskStream(s.theta, s.theta2, self.fpc, s.mask_lookahead, s.recipe.dilation_frames,
                                 s.recipe.bound_after_cleanup)
        times, next_frame = deque(), 0  # the capture times of the frames not yet sent back, in order
        for chunk in sample.edit_chunks(self._pieces(vae, times), vae, {"lipar": _Switching(editor, self)}, masks):
            frames = io.from_model(chunk.videos["lipar"])
            count = min(len(frames), len(times))
            for pixels in frames[:count]:
                ms = times.popleft()
                rgba = torch.cat([pixels, torch.full_like(pixels[..., :1], 255)], -1)
                self.send("frame", HEADER.pack(ms) + rgba.cpu().numpy().tobytes())
            now = time.perf_counter()
            self.sent.append((now, count))
            span = now - self.sent[0][0]
            keep = chunk.keep
            self.send("json", {
                "type": "chunk", "frames": count, "first_frame": next_frame, "prompt": self.chunk_prompts.popleft(),
                "prune_ratio": 0.0 if keep is None else lipar.prune_ratio(keep) if next_frame == 0  # frame 0: never
                else 1 - keep.float().mean().item(),
                "chunk_latency_s": now - self.read_at, "dropped": self.dropped,
                "edited_fps": sum(n for _, n in list(self.sent)[1:]) / span if span > 0 else None,
                "gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
                "mask": None if keep is None else base64.b64encode(keep[-1].to(torch.uint8).cpu().numpy().tobytes()).decode(),
                "mask_shape": None if keep is None else list(keep.shape[1:])})
            next_frame += count


class _Switching:
    """The session's editor, taking the prompts typed since the last chunk at this boundary."""

    def __init__(self, editor, session):
        self.editor, self.session = editor, session

    def __call__(self, latents, keep=None):
        s = self.session
        change = s.take_change()  # several typed before one boundary: the last one wins
        if change is not None:
            text, context = change
            self.editor.schedule.append((0, text, context))
            s.prompt = text
        s.chunk_prompts.append(s.prompt)
        return self.editor(latents, keep)


class Outbox:
    """What waits to go to the page, in order: at most `frames` edited frames (when the
    page reads slower than the GPU edits, the oldest waiting frame is dropped and counted
    in the next chunk's "dropped_edited") and at most as many messages. Used from the
    event loop's thread only."""

    def __init__(self, frames):
        self.items, self.limit = deque(), frames
        self.waiting = {"frame": 0, "json": 0}
        self.dropped = 0
        self.ready = asyncio.Event()

    def put(self, kind, payload):
        if self.waiting[kind] == self.limit:  # the oldest of its kind goes
            oldest = next(i for i, (k, _) in enumerate(self.items) if k == kind)
            del self.items[oldest]
            self.waiting[kind] -= 1
            self.dropped += kind == "frame"
        if kind == "json" and payload.get("type") == "chunk":
            payload["dropped_edited"] = self.dropped
        self.items.append((kind, payload))
        self.waiting[kind] += 1
        self.ready.set()

    async def get(self):
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        kind, payload = self.items.popleft()
        self.waiting[kind] -= 1
        return kind, payload


class Server:
    """The page and its WebSocket; at most one Session at a time."""

    def __init__(self, models, settings, encode, max_message=128 * 2**20, outbox=64, queue_chunks=2, fusion=None):
        self.models, self.settings, self.encode, self.queue_chunks = models, settings, encode, queue_chunks
        self.fusion = fusion  # as model.fusion takes it (cli.fusion)
        self.frame_bytes = HEADER.size + settings.width * settings.height * 4
        self.max_message, self.outbox_size = max_message, outbox
        self.session = None
        self.context = encode(settings.prompt)

    def app(self):
        from aiohttp import web
        app = web.Application()
        async def page(request):
            return web.FileResponse(PAGE)

        app.router.add_get("/", page)
        app.router.add_get("/ws", self.websocket)
        return app

    async def websocket(self, request):
        from aiohttp import WSMsgType, web
        ws = web.WebSocketResponse(max_msg_size=self.max_message)
        await ws.prepare(request)
        if self.session is not None:
            await ws.send_json({"type": "error", "message": "another page is editing; one at a time: close it "
                                                            "and reload this one"})
            await ws.close()
            return ws
        loop = asyncio.get_running_loop()
        outbox = Outbox(self.outbox_size)

        def send(kind, payload):  # from the edit thread, into the loop's thread
            loop.call_soon_threadsafe(outbox.put, kind, payload)

        async def sender():
            while True:
                kind, payload = await outbox.get()
                await (ws.send_json(payload) if kind == "json" else ws.send_bytes(payload))

        s = self.settings
        session = self.session = Session(self.models, self.context, s, send, self.encode, self.queue_chunks,
                                         self.fusion)
        await ws.send_json({"type": "hello", "width": s.width, "height": s.height, "prompt": s.prompt,
                            "chunk_frames": self.models.vae().chunk_frames(session.fpc, False)})
        session.thread.start()
        sending = asyncio.create_task(sender())
        try:
            async for message in ws:
                if message.type == WSMsgType.BINARY:
                    problem = self.frame_problem(message.data)
                    if problem:
                        await ws.send_json({"type": "error", "message": problem})
                        continue
                    (ms,) = HEADER.unpack_from(message.data)
                    pixels = torch.frombuffer(bytearray(message.data), dtype=torch.uint8, offset=HEADER.size)
                    session.push(pixels.view(s.height, s.width, 4)[..., :3], ms)
                elif message.type == WSMsgType.TEXT:
                    problem = self.control(session, message.data)
                    if problem:
                        await ws.send_json({"type": "error", "message": problem})
        finally:  # the client left (or the server stops): end the edit, then free its state
            session.stop()
            sending.cancel()
            ended = asyncio.ensure_future(asyncio.to_thread(session.thread.join))
            ended.add_done_callback(lambda _: setattr(self, "session", None))  # even if this handler is cancelled
            await asyncio.shield(ended)
        return ws

    def frame_problem(self, data):
        if len(data) != self.frame_bytes:
            s = self.settings
            return (f"a frame is {self.frame_bytes} bytes (an 8-byte capture time, then {s.width}x{s.height} RGBA); "
                    f"this one was {len(data)}")
        return None

    def control(self, session, text):
        """Apply one JSON control message; a sentence on what is wrong with it, or None."""
        try:
            message = json.loads(text)
        except json.JSONDecodeError:
            return "a control message is JSON, e.g. {\"type\": \"pause\"}; this one did not parse"
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "prompt":
            prompt = message.get("text")
            if not isinstance(prompt, str) or not prompt.strip():
                return "a prompt message needs a non-empty \"text\""
            session.change_prompt(prompt.strip())
        elif kind in ("pause", "resume"):
            session.pause(kind == "pause")
        else:
            return f"unknown message type {kind!r}; send prompt, pause or resume"
        return None


def parser():
    p = cli.Parser(description="A live page: the webcam edited as you watch (see the README's \"Live editing\").",
                   formatter_class=cli.HelpFormatter)
    p.add_argument("--weights", default="weights", help="weights folder (weights.md); without one, tiny random models")
    p.add_argument("--prompt", default="a watercolor painting of the scene", help="the prompt the edit starts with")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but 127.0.0.1 exposes the "
                                                       "page (and your GPU) to the network")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--vae", choices=["tiny", "wan"], default="tiny", help="tiny (TAEHV, the default: live speed) or wan")
    p.add_argument("--height", type=int, default=None, help="model height, a multiple of 16 (default 480; 64 with "
                                                            "random weights)")
    p.add_argument("--width", type=int, default=None, help="model width, a multiple of 16 (default 832; 112 with "
                                                           "random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--fusion", choices=["triton", "compile", "off"],
                   help="the fused kernels on CUDA, as sample.py --fusion (default triton)")
    p.add_argument("--fp8", action="store_true", help="the DiT's feed-forward products in fp8, as sample.py --fp8 "
                   "(GPUs of compute capability 8.9+)")
    return p


def settings_of(args, random_weights):
    height = (64 if random_weights else 480) if args.height is None else args.height  # 0 is refused, not a default
    width = (112 if random_weights else 832) if args.width is None else args.width
    problems = [f"--{name} {value} is not a multiple of 16 from 16 to {cli.MAX_SIDE}"
                for name, value in (("height", height), ("width", width))
                if value % 16 or not 16 <= value <= cli.MAX_SIDE]
    if (problem := cli.device_problem(args.device)):
        problems.append(f"--device {args.device!r}: {problem}")
    problems += [p for p in (cli.cuda_only_problem(args.device, {"fusion": args.fusion}),
                             cli.prompt_problem(args.prompt)) if p]
    if problem := cli.fp8_problem(args.device, args.fp8):
        problems.append(problem)
    if not 0 < args.port < 65536:
        problems.append(f"--port {args.port} is not a port; give 1 to 65535")
    else:
        try:
            socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            problems.append(f"--host {args.host!r} is no address of this machine; give 127.0.0.1, 0.0.0.0 (every "
                            "interface) or a name that resolves")
    cli.refuse(problems)
    return EditSettings(prompt=args.prompt, modes=["lipar"], vae=args.vae, height=height, width=width)


def make_server(args):
    random_weights = not Path(args.weights).exists()
    settings = settings_of(args, random_weights)
    models = sample.Models(None if random_weights else args.weights, args.device, cli.model_dtype(args),
                           args.device, vae=settings.vae, fp8=args.fp8)
    encoder = models.text_encoder()  # kept: every prompt typed is encoded with it
    models.vae(), models.dit()  # loaded now, not when the first page connects

    def encode(text):  # beside the edit: the encoder stays, and no cache is emptied under the DiT's feet
        return encoder.encode([text]).to(torch.device(args.device), models.dtype)

    return Server(models, settings, encode, fusion=cli.fusion(args)), random_weights


def main(argv=None):
    args = parser().parse_args(argv)
    args.dtype = None
    server, random_weights = make_server(args)
    if args.host != "127.0.0.1":
        print(f"warning: listening on {args.host}: anyone who can reach this machine can use the page",
              file=sys.stderr)
    if random_weights:
        print(f"No weights at {args.weights}: tiny RANDOM-weight models; the page works, the pixels are no edit.")
    from aiohttp import web
    print(f"live page: http://{args.host}:{args.port}  (Ctrl-C stops the server)")
    try:
        web.run_app(server.app(), host=args.host, port=args.port, print=None)
    except OSError as err:  # the port is taken, or the address is not this machine's
        raise cli.UsageError(f"cannot listen on {args.host}:{args.port} ({err.strerror or err}); give another --port "
                             "or --host") from None
    return 0


if __name__ == "__main__":
    sys.exit(cli.guarded(main))
