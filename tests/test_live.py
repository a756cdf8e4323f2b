"""live.py's server, through a real WebSocket on the CPU with the demo's tiny random
models: the page's edit is sample.py's chunk pipeline on the same frames, a typed prompt
lands at the next chunk, pause stops the output and resume restarts it, bad messages
get one sentence each while the server keeps serving, queues stay bounded under a
flood, one client at a time, and a client that leaves frees its state."""

import asyncio
import struct
import threading
import time

import pytest
import torch

pytest.importorskip("aiohttp", reason="aiohttp is in requirements.txt")

from aiohttp import WSMsgType  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

import cli  # noqa: E402
import live  # noqa: E402
import lipar  # noqa: E402
import sample  # noqa: E402
import video as io  # noqa: E402

TIMEOUT = 60


@pytest.fixture(scope="module")
def server():
    args = live.parser().parse_args(["--weights", "/nonexistent", "--device", "cpu"])
    args.dtype = None
    made, random_weights = live.make_server(args)
    assert random_weights
    return made


def frames(count, server, seed=0):
    """Moving frames at the model's size: [count, H, W, 3] uint8."""
    s = server.settings
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (s.height, s.width, 3), generator=g, dtype=torch.uint8)
    return torch.stack([base.roll(2 * i, dims=1) for i in range(count)])


def message(pixels, ms):
    rgba = torch.cat([pixels, torch.full_like(pixels[..., :1], 255)], -1)
    return struct.pack("<d", ms) + rgba.numpy().tobytes()


def run(server, script):
    async def go():
        client = TestClient(TestServer(server.app()))
        await client.start_server()
        try:
            return await script(client)
        finally:
            await client.close()
            for _ in range(200):  # the server frees the session once its handler has finished
                if server.session is None:
                    break
                await asyncio.sleep(0.05)
    return asyncio.run(go())


async def receive(ws, until, timeout=TIMEOUT):
    """Messages until until(frames, jsons) holds: (edited frames [(ms, RGB)], JSON messages)."""
    got, jsons, end = [], [], time.monotonic() + timeout
    while not until(got, jsons):
        try:
            m = await ws.receive(timeout=max(0.1, end - time.monotonic()))
        except TimeoutError:
            break
        if m.type == WSMsgType.BINARY:
            (ms,) = struct.unpack_from("<d", m.data)
            got.append((ms, m.data[8:]))
        elif m.type == WSMsgType.TEXT:
            jsons.append(m.json())
        else:
            break
    return got, jsons


def chunks(jsons):
    return [j for j in jsons if j["type"] == "chunk"]


def test_the_page_gets_what_sample_py_edits_from_the_same_frames(server):
    clip = frames(36, server)

    async def script(client):
        ws = await client.ws_connect("/ws")
        hello = await ws.receive_json()
        assert (hello["width"], hello["height"]) == (server.settings.width, server.settings.height)
        for i, pixels in enumerate(clip[:24]):  # two pieces: the queue holds two, nothing dropped
            await ws.send_bytes(message(pixels, float(i)))
        await asyncio.sleep(0.2)
        for i, pixels in enumerate(clip[24:], 24):
            await ws.send_bytes(message(pixels, float(i)))
        got, jsons = await receive(ws, lambda got, _: len(got) >= 21)  # the tiny VAE: 9, then 12 a chunk
        await ws.close()
        return got, jsons

    got, jsons = run(server, script)
    assert [ms for ms, _ in got[:21]] == [float(i) for i in range(21)]  # in order, each with its source's time
    assert all(j["dropped"] == 0 for j in chunks(jsons))
    s = server.settings
    assert all(0 <= j["prune_ratio"] <= 1 and j["mask_shape"] == [s.height // 16, s.width // 16] for j in chunks(jsons))
    # the same pipeline offline: sample.edit_chunks over the same pieces
    models = server.models
    vae, dit = models.vae(), models.dit()
    editors = sample.make_editors(models, server.context, (s.height // 16, s.width // 16), s)
    masks = lipar.MaskStream(s.theta, s.theta2, dit.cfg.frames_per_chunk, s.mask_lookahead)
    pieces = [io.to_model(clip[a:b]) for a, b in ((0, 12), (12, 24), (24, 36))]
    with torch.no_grad():
        expected = torch.cat([io.from_model(c.videos["lipar"]) for c in sample.edit_chunks(iter(pieces), vae, editors,
                                                                                              masks)])
    for (_, rgba), want in zip(got[:21], expected[:21], strict=True):
        frame = torch.frombuffer(bytearray(rgba), dtype=torch.uint8).view(s.height, s.width, 4)
        assert torch.equal(frame[..., :3], want) and bool((frame[..., 3] == 255).all())


def test_a_typed_prompt_takes_effect_at_the_next_chunk(server):
    """A chunk is edited once the mask has seen the next piece: after the first chunk came
    back, the second is the next to be edited, and the prompt typed then is its prompt."""
    clip = frames(48, server, seed=1)

    async def script(client):
        ws = await client.ws_connect("/ws")
        await ws.receive_json()
        for i, pixels in enumerate(clip[:24]):
            await ws.send_bytes(message(pixels, float(i)))
        _, first = await receive(ws, lambda _, j: len(chunks(j)) >= 1)
        await ws.send_json({"type": "prompt", "text": "a snowy street"})
        for i, pixels in enumerate(clip[24:], 24):
            await ws.send_bytes(message(pixels, float(i)))
            await asyncio.sleep(0.01)
        _, later = await receive(ws, lambda _, j: len(chunks(j)) >= 2)
        await ws.close()
        return chunks(first + later)

    done = run(server, script)
    assert done[0]["prompt"] == server.settings.prompt
    assert [c["prompt"] for c in done[1:3]] == ["a snowy street"] * 2
    assert done[1]["first_frame"] == done[0]["frames"] == 9


def test_a_typed_prompt_is_encoded_as_it_arrives_and_a_flood_of_them_stays_bounded(server):
    """The text encoder runs when the prompt arrives, in a thread of its own, not at the
    boundary on the edit's; fifty typed during one encoding start at most two more
    (each new one cancels the waiting one), and the boundary takes the last."""
    calls, started = [], threading.Event()

    def slow_encode(text):
        calls.append((text, threading.current_thread().name))
        started.set()
        time.sleep(0.3)
        return torch.full((1, 1), float(len(calls)))

    session = live.Session(server.models, server.context, server.settings, lambda *a: None, slow_encode)
    try:
        session.change_prompt("first")
        assert started.wait(TIMEOUT)
        for i in range(50):
            session.change_prompt(f"typed {i}")
        editor = type("Editor", (), {"schedule": [], "__call__": lambda self, latents, keep=None: "edited"})()
        assert live._Switching(editor, session)(None) == "edited"
    finally:
        session.encoding.shutdown(wait=True)
    assert [text for text, _ in calls] == ["first", "typed 49"]
    assert all(name.startswith("prompt") for _, name in calls)
    assert [(f, text) for f, text, _ in editor.schedule] == [(0, "typed 49")] and session.prompt == "typed 49"
    assert session.take_change() is None  # taken once


def test_pause_stops_the_output_and_resume_restarts_it(server):
    clip = frames(60, server, seed=2)

    async def script(client):
        ws = await client.ws_connect("/ws")
        await ws.receive_json()
        await ws.send_json({"type": "pause"})
        for i, pixels in enumerate(clip[:36]):
            await ws.send_bytes(message(pixels, float(i)))
        paused, _ = await receive(ws, lambda got, _: len(got) > 0, timeout=3)
        await ws.send_json({"type": "resume"})
        for i, pixels in enumerate(clip[36:], 36):
            await ws.send_bytes(message(pixels, float(i)))
            await asyncio.sleep(0.01)
        resumed, jsons = await receive(ws, lambda got, j: len(got) > 0 and chunks(j))
        await ws.close()
        return paused, resumed, jsons

    paused, resumed, jsons = run(server, script)
    assert paused == [] and resumed
    assert resumed[0][0] == 36.0  # the first frame sent after resuming: the paused ones were never queued
    assert chunks(jsons)[0]["dropped"] == 36


def test_bad_messages_get_a_sentence_each_and_the_server_keeps_serving(server):
    s = server.settings

    async def script(client):
        ws = await client.ws_connect("/ws")
        await ws.receive_json()
        errors = []
        for bad in ("not json", '{"type": "dance"}', '{"type": "prompt", "text": "  "}', "[1, 2]"):
            await ws.send_str(bad)
            errors.append((await ws.receive_json())["message"])
        for size in (10, 8 + s.width * s.height * 4 + 1, 100 * 2**20):  # short, one byte long, 100 MB
            await ws.send_bytes(bytes(size))
            errors.append((await ws.receive_json())["message"])
        for i, pixels in enumerate(frames(24, server, seed=3)):  # still serving: two pieces, the first chunk
            await ws.send_bytes(message(pixels, float(i)))
        got, _ = await receive(ws, lambda got, _: len(got) >= 9)
        await ws.close()
        return errors, got

    errors, got = run(server, script)
    assert "did not parse" in errors[0] and "unknown message type 'dance'" in errors[1]
    assert "non-empty" in errors[2] and "unknown message type None" in errors[3]
    assert all(f"a frame is {8 + s.width * s.height * 4} bytes" in e for e in errors[4:])
    assert "this one was 104857600" in errors[6]
    assert len(got) >= 9


def test_a_flood_of_frames_is_dropped_oldest_first_never_queued_without_bound(server):
    clip = frames(200, server, seed=4)
    seen = []

    async def script(client):
        ws = await client.ws_connect("/ws")
        await ws.receive_json()
        for i, pixels in enumerate(clip):
            await ws.send_bytes(message(pixels, float(i)))
        await asyncio.sleep(0.1)
        seen.append(len(server.session.frames))
        got, jsons = await receive(ws, lambda got, j: len(got) >= 9 and chunks(j))
        await ws.close()
        return got, jsons

    got, jsons = run(server, script)
    limit = server.queue_chunks * server.models.vae().chunk_frames(3, False)
    assert seen[0] <= limit
    # every frame is dropped, waiting, or taken by a chunk being edited; on a loaded 2-core
    # machine the server takes a few chunks of 12 while the flood arrives: allow four
    assert chunks(jsons)[0]["dropped"] >= 200 - limit - 4 * 12
    assert got[-1][0] > got[0][0]


def test_edited_frames_waiting_for_a_slow_page_are_bounded_and_counted():
    async def go():
        outbox = live.Outbox(4)
        outbox.put("json", {"type": "error", "message": "first"})
        for i in range(100):
            outbox.put("frame", i)
        outbox.put("json", {"type": "chunk"})
        assert outbox.waiting == {"frame": 4, "json": 2}
        return [await outbox.get() for _ in range(6)]

    got = asyncio.run(go())
    assert got == [("json", {"type": "error", "message": "first"}), ("frame", 96), ("frame", 97), ("frame", 98),
                   ("frame", 99), ("json", {"type": "chunk", "dropped_edited": 96})]


def test_one_client_at_a_time_and_a_client_that_leaves_frees_its_state(server):
    async def script(client):
        first = await client.ws_connect("/ws")
        await first.receive_json()
        second = await client.ws_connect("/ws")
        refused = await second.receive_json()
        closed = await second.receive()
        for i, pixels in enumerate(frames(8, server, seed=5)):  # mid-chunk: the piece is not complete
            await first.send_bytes(message(pixels, float(i)))
        await first.close()
        for _ in range(100):
            if server.session is None:
                break
            await asyncio.sleep(0.05)
        freed = server.session is None
        third = await client.ws_connect("/ws")
        hello = await third.receive_json()
        await third.close()
        return refused, closed.type, freed, hello

    refused, closed, freed, hello = run(server, script)
    assert refused == {"type": "error", "message": "another page is editing; one at a time: close it and reload "
                                                   "this one"}
    assert closed == WSMsgType.CLOSE and freed and hello["type"] == "hello"


@pytest.mark.parametrize("flags, named", [(["--port", "0"], "--port 0 is not a port"),
                                          (["--height", "50"], "--height 50 is not a multiple of 16"),
                                          (["--width", "0"], "--width 0 is not a multiple of 16"),
                                          (["--device", "tpu"], "--device 'tpu'"),
                                          (["--device", "cpu", "--fusion", "triton"], "--fusion only changes how"),
                                          (["--prompt", ""], "--prompt is empty"),
                                          (["--host", "no-such-host.invalid"], "is no address of this machine")])
def test_bad_flags_are_one_sentence(flags, named, capsys):
    assert cli.guarded(live.main, ["--weights", "/nonexistent", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and err.count("\n") == 1


def test_fp8_gives_the_page_an_fp8_dit(server):
    """--fp8 reaches the server's models: the FFN's products are fp8 layers there, and
    not in the server made without it (tiny random models on the CPU)."""
    import fp8

    args = live.parser().parse_args(["--weights", "/nonexistent", "--device", "cpu", "--fp8"])
    args.dtype = None
    made, _ = live.make_server(args)
    assert all(isinstance(block.ffn[i], fp8.Fp8Linear) for block in made.models.dit().blocks for i in (0, 2))
    assert not any(isinstance(m, fp8.Fp8Linear) for m in server.models.dit().modules())


def test_a_port_in_use_is_one_sentence(capsys):
    """The models load, then the bind fails: one sentence naming the address, exit code 2."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.guarded(live.main, ["--weights", "/nonexistent", "--device", "cpu", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
