"""The live page in a real browser: headless Chromium with its fake camera, driven by
Selenium, against live.py's server with the demo's tiny random models on the CPU. The
page loads, takes the camera, edited frames come back, a typed prompt takes effect at
the next chunk (the figures say which), pause stops the output, resume restarts it, a
video file picked on the page is edited in the camera's place, and the server stops
cleanly.

.ci/run installs Chromium and its driver from Debian's packages and sets
LIPAR_BROWSER_TEST=1, so there a missing browser fails the test; elsewhere it is skipped
with the reason shown."""

import asyncio
import os
import shutil
import socket
import threading
import time

import pytest

import live

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    if os.environ.get("LIPAR_BROWSER_TEST") == "1":
        raise RuntimeError("LIPAR_BROWSER_TEST=1 but Chromium or chromedriver is missing: apt-get install chromium "
                           "chromium-driver")
    pytest.skip("Chromium and chromedriver are not installed (.ci/run installs them)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")


class ServerThread:
    """live.Server on a free port, in a thread with its own event loop."""

    def __init__(self, server):
        from aiohttp import web
        self.server, self.web = server, web
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.runner = self.web.AppRunner(self.server.app())
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(self.web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.started.set()
        self.loop.run_forever()

    def __enter__(self):
        self.thread.start()
        assert self.started.wait(30)
        return f"http://127.0.0.1:{self.port}/"

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        assert not self.thread.is_alive()


def webm_clip(path):
    """The demo scene as a 24-frame VP8 WebM."""
    import av

    import demo
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx", rate=16)
        stream.width, stream.height, stream.pix_fmt = 224, 128, "yuv420p"
        for frame in demo.demo_frames(128, 224, 24).numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def wait_for(driver, script, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {script}")


def test_the_live_page_edits_the_fake_camera_changes_prompt_pauses_and_resumes(tmp_path):
    args = live.parser().parse_args(["--weights", str(tmp_path / "none"), "--device", "cpu"])
    args.dtype = None
    server, _ = live.make_server(args)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", "--window-size=1200,800"):
        options.add_argument(flag)
    with ServerThread(server) as url:
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
        try:
            driver.get(url)
            wait_for(driver, "return window.lipar.width > 0")  # the hello arrived
            driver.find_element("id", "camera").click()
            wait_for(driver, "return window.lipar.edited > 0")
            before = driver.execute_script("return window.lipar.chunks")
            driver.find_element("id", "prompt").send_keys("a snowy street")
            driver.find_element("id", "apply").click()
            switched = wait_for(driver, "const c = window.lipar.lastChunk; "
                                        "return c && c.prompt === 'a snowy street' && c")
            assert driver.execute_script("return window.lipar.chunks") > before
            assert switched["first_frame"] > 0
            assert driver.find_element("id", "current-prompt").text == "a snowy street"
            assert driver.find_element("id", "fps").text != "-"
            driver.save_screenshot(str(tmp_path / "live.png"))
            driver.find_element("id", "overlay").click()  # the mask drawn over the next frames
            wait_for(driver, f"return window.lipar.edited > {driver.execute_script('return window.lipar.edited')}")

            driver.find_element("id", "pause").click()
            time.sleep(1.5)  # a chunk already being edited may still arrive
            paused = driver.execute_script("return window.lipar.edited")
            time.sleep(2.0)
            assert driver.execute_script("return window.lipar.edited") == paused
            driver.find_element("id", "pause").click()  # resume
            wait_for(driver, f"return window.lipar.edited > {paused}")

            # a video file picked on the page instead of the camera (VP8 in WebM: Debian's
            # Chromium plays it without proprietary codecs)
            driver.find_element("id", "file").send_keys(str(webm_clip(tmp_path / "clip.webm")))
            wait_for(driver, "return document.getElementById('source').currentSrc.startsWith('blob:')")
            before = driver.execute_script("return window.lipar.chunks")
            wait_for(driver, f"return window.lipar.chunks >= {before + 2}")  # past any chunk of camera frames
            assert driver.find_element("id", "error").text == ""
        finally:
            driver.quit()
        for _ in range(100):  # the page is gone: its session ends and frees its state
            if server.session is None:
                break
            time.sleep(0.05)
        assert server.session is None
