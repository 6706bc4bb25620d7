"""``demo/web.py``, the Gradio web demo, in a real browser and through ``gradio_client``.

A server subprocess runs the tiny shapes model with random weights (saved with detectron2's
checkpointer, so the strict loader accepts them) and a tiny random SAM folder (``--sam``,
``tests/sam_reference.py``); the expected boxes come from ``GroundingDINOPredictor`` in this
process, the expected masks from the mask stage on those boxes. The browser is Debian's
headless Chromium driven by Selenium through ``/usr/bin/chromedriver`` (``make test`` installs
them: ``scripts/setup_test_deps.sh``); a missing browser fails the test, it is not skipped.
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hostile_images import gray_png_bomb, not_an_image, truncated_png
from sam_reference import tiny_segmenter_folder

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "shapes_tiny.py")
OVERRIDES = ["model.max_detections=6", "train.device=cpu"]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_kb(pid: int, field: str = "VmHWM") -> int:
    """A process's resident memory in kB: its peak (VmHWM) or its current size (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _vm_hwm_kb(pid: int) -> int:
    return _memory_kb(pid, "VmHWM")


def _scene(path: Path, seed: int, height: int = 192, width: int = 224) -> str:
    """A PNG of coloured shapes on a noisy background."""
    rng = np.random.default_rng(seed)
    image = rng.integers(90, 140, (height, width, 3), dtype=np.uint8)
    for _ in range(3):
        x, y = int(rng.integers(10, width - 60)), int(rng.integers(10, height - 60))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        cv2.rectangle(image, (x, y), (x + 40, y + 40), color, -1)
    cv2.imwrite(str(path), image)
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weights of configs/shapes_tiny.py, saved as detectron2's checkpointer does."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import instantiate

    from grounding_dino.model_zoo import get_config

    torch.manual_seed(0)
    model = instantiate(get_config("shapes_tiny.py").model)
    folder = tmp_path_factory.mktemp("web_weights")
    DetectionCheckpointer(model, save_dir=str(folder)).save("model")
    return str(folder / "model.pth")


@pytest.fixture(scope="module")
def sam_folder(tmp_path_factory):
    """A tiny perturbed random SamModel folder (config, weights, processor)."""
    return tiny_segmenter_folder("sam", tmp_path_factory.mktemp("web_sam") / "sam")[2]


@pytest.fixture(scope="module")
def predictor(weights):
    from grounding_dino.predictor import GroundingDINOPredictor

    return GroundingDINOPredictor.from_config_file(CONFIG, weights=weights, overrides=OVERRIDES)


@pytest.fixture(scope="module")
def server(weights, sam_folder, tmp_path_factory):
    """The web demo (with --sam) in a subprocess on a free port; yields (url, pid)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("web_server") / "server.log"
    env = dict(
        os.environ,
        GRADIO_ANALYTICS_ENABLED="True",  # demo/web.py turns them off whatever the environment says
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
    )
    command = [sys.executable, str(REPO / "demo" / "web.py"), "--config-file", CONFIG]
    command += ["--weights", weights, "--port", str(port), "--box-threshold", "0"]
    command += ["--sam", sam_folder]
    command += ["--opts", *OVERRIDES]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"the web demo exited with {process.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the web demo did not answer on {url}:\n{log.read_text()}")
            time.sleep(0.5)
        yield url, process.pid
        assert process.poll() is None, f"the web demo stopped:\n{log.read_text()}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def expected_output(predictor, path: str, prompt, box_threshold=0.0, nms=0.5, rec=False):
    """The predictor's output on the same file with the page's settings."""
    from nms_reference import nms_output

    from grounding_dino.modeling.settings import NMS_CANDIDATES

    image = cv2.imread(path)
    settings = predictor.settings.replace(box_threshold=box_threshold, text_threshold=0.25)
    if rec:
        output = predictor.predict_rec(image, prompt, settings=settings)
    else:
        # The page's NMS runs over the best NMS_CANDIDATES candidates, then keeps the
        # configured max_detections.
        budget = settings.max_detections
        candidates = settings.replace(max_detections=max(budget, NMS_CANDIDATES))
        output = nms_output(predictor(image, prompt, settings=candidates), nms, budget)
    return output


def expected_rows(predictor, path: str, prompt, **settings):
    """(phrase, score, x0, y0, x1, y1) rows of the predictor on the same file and settings."""
    output = expected_output(predictor, path, prompt, **settings)
    boxes = output["instances"].pred_boxes.tensor.tolist()
    scores = output["instances"].scores.tolist()
    return [(p, s, *b) for p, s, b in zip(output["phrases"], scores, boxes)]


def assert_rows_equal(rows, expected):
    """Same phrases, scores to the table's 3 decimals, boxes to 0.5 px (its 1 decimal)."""
    assert len(rows) == len(expected) > 0, (rows, expected)
    for row, want in zip(rows, expected):
        assert row[0] == want[0], (row, want)
        assert abs(float(row[1]) - want[1]) <= 1e-3, (row, want)
        np.testing.assert_allclose([float(v) for v in row[2:]], want[2:], atol=0.5)


def _chrome(user_data_dir: str):
    os.environ.setdefault("SE_OFFLINE", "1")  # Selenium Manager must not download a driver
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.isfile(path)]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} missing: the browser test needs Debian's chromium and "
            f"chromium-driver; `.ci/run` installs them (apt-get install chromium "
            f"chromium-driver, as root)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={user_data_dir}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _table(driver):
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#boxes .virtual-row")
    return [
        [cell.text for cell in row.find_elements(By.CSS_SELECTOR, ".body-cell")] for row in rows
    ]


def test_browser_upload_prompt_and_table_match_the_predictor(server, predictor, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    image = _scene(tmp_path / "scene.png", seed=1)
    prompt = "red square, blue circle, green triangle"
    driver = _chrome(tempfile.mkdtemp(dir=tmp_path))
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(url)
        upload = wait.until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image input[type=file]")
        )[0]
        # Bad input first: no image gives a message in the page, and the server keeps serving.
        driver.find_element(By.CSS_SELECTOR, "#detect").click()
        wait.until(lambda d: "No image: upload one" in d.find_element(By.TAG_NAME, "body").text)

        upload.send_keys(image)
        driver.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(prompt)
        driver.find_element(By.CSS_SELECTOR, "#masks-switch input[type=checkbox]").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image img"))
        driver.find_element(By.CSS_SELECTOR, "#detect").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#result-image img"))
        wait.until(lambda d: "boxes (" in d.find_element(By.CSS_SELECTOR, "#status").text)
        wait.until(lambda d: any(cell for row in _table(d) for cell in row))
        rows = _table(driver)
        screenshot = tmp_path / "web_demo.png"
        driver.save_screenshot(str(screenshot))
        source = driver.find_element(By.CSS_SELECTOR, "#result-image img").get_attribute("src")
        page = driver.find_element(By.TAG_NAME, "body").text
    finally:
        driver.quit()

    assert screenshot.stat().st_size > 10_000
    assert "/file=" in source or source.startswith("data:image"), source
    assert "Traceback" not in page
    expected = expected_rows(predictor, image, [n.strip() for n in prompt.split(",")])
    assert_rows_equal(rows, expected)
    assert f"{len(expected)} boxes" in page
    assert "a mask each" in page  # the Masks switch, ticked (the server has --sam)


def test_eight_concurrent_clients_and_bad_inputs(server, predictor, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url, pid = server
    client = Client(url, verbose=False)
    settings = (0.0, 0.25, False, 0.5)  # box threshold, text threshold, REC, NMS

    def call(path, prompt, *overrides):
        values = list(settings)
        for index, value in overrides:
            values[index] = value
        return client.predict(handle_file(path), prompt, *values, api_name="/detect")

    first = _scene(tmp_path / "warm.png", seed=0)
    call(first, "red square")  # warm-up: the first request allocates the model's buffers
    hwm_before = _vm_hwm_kb(pid)

    requests = []
    for i in range(8):
        path = _scene(tmp_path / f"scene{i}.png", seed=10 + i, height=160 + 16 * i)
        prompt = ["red square, blue circle", "green star . purple cross ."][i % 2]
        requests.append((path, prompt, i == 7))  # the last one in REC mode
    start = time.time()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call, path, prompt, (2, rec)) for path, prompt, rec in requests]
        answers = [f.result(timeout=120) for f in futures]
    elapsed = time.time() - start
    hwm_after = _vm_hwm_kb(pid)

    for (path, prompt, rec), (drawn, table, status, masks) in zip(requests, answers):
        parsed = prompt if rec or "," not in prompt else [p.strip() for p in prompt.split(",")]
        expected = expected_rows(predictor, path, parsed, rec=rec)
        assert_rows_equal(table["data"], expected)
        assert cv2.imread(drawn).shape[:2] == cv2.imread(path).shape[:2]
        assert status.startswith(f"{len(expected)} boxes")
        assert masks == []  # not asked for
    assert len(answers[-1][1]["data"]) == 1  # REC: exactly one box

    # Bad inputs: a message each, and the server keeps serving.
    tiny = str(tmp_path / "tiny.png")
    cv2.imwrite(tiny, np.zeros((20, 30, 3), np.uint8))
    huge = str(tmp_path / "huge.png")
    cv2.imwrite(huge, np.zeros((5200, 5000, 3), np.uint8))  # 26 megapixels, a small file
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    cases = [
        (lambda: call(first, "   "), "The prompt is empty"),
        (lambda: client.predict(None, "cat", *settings, api_name="/detect"), "No image"),
        (lambda: call(tiny, "cat"), "30x20 pixels, smaller than 64"),
        (
            lambda: call(huge, "cat"),
            "5000x5200 = 26,000,000 pixels, more than the limit of 25,000,000",
        ),
        (lambda: call(str(not_an_image), "cat"), "The upload cannot be used: not an image"),
        (lambda: call(first, "cat", (0, 1.5)), "Value 1.5 is greater than maximum value 1"),
    ]
    for send, message in cases:
        with pytest.raises(AppError, match=re.escape(message)):
            send()
    assert_rows_equal(
        call(first, "red square")[1]["data"], expected_rows(predictor, first, "red square")
    )

    growth_mb = (hwm_after - hwm_before) / 1024
    print(
        f"\n8 concurrent requests in {elapsed:.1f} s; server peak RSS (VmHWM) "
        f"{hwm_before / 1024:.0f} MB before, {hwm_after / 1024:.0f} MB after "
        f"(+{growth_mb:.0f} MB)"
    )
    assert growth_mb < 1536, f"peak memory grew by {growth_mb:.0f} MB for 8 queued requests"


def test_analytics_are_off_although_the_environment_turns_them_on(server):
    url, _ = server  # started with GRADIO_ANALYTICS_ENABLED=True
    with urllib.request.urlopen(url + "config", timeout=30) as response:
        config = json.load(response)
    assert config["analytics_enabled"] is False


def test_identical_requests_get_distinct_result_files(server, tmp_path):
    """Two requests with the same answer get a drawing file each (Gradio's content-hashed
    cache rewrote one shared file while a client downloaded it), complete and equal."""
    from gradio_client import Client, handle_file

    url, _ = server
    client = Client(url, verbose=False, download_files=False)
    scene = _scene(tmp_path / "same.png", seed=5)
    answers = [
        client.predict(handle_file(scene), "red square", 0.0, 0.25, False, 0.5, api_name="/detect")
        for _ in range(2)
    ]
    first, second = (answer[0] for answer in answers)
    assert first["path"] != second["path"]
    assert os.path.dirname(first["path"]) == os.path.dirname(second["path"])
    drawings = []
    for drawn in (first, second):
        with urllib.request.urlopen(drawn["url"], timeout=30) as response:
            drawings.append(response.read())
    assert drawings[0] == drawings[1]
    image = cv2.imdecode(np.frombuffer(drawings[0], np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == cv2.imread(scene).shape


def test_masks_through_the_api_are_the_stages_rles(server, predictor, sam_folder, tmp_path):
    """Masks on: one COCO RLE per table row, which pycocotools decodes to the mask the stage
    gives for the predictor's box; off (the API's default): none."""
    from gradio_client import Client, handle_file
    from pycocotools import mask as mask_utils

    from grounding_dino.segment import MaskStage

    url, _ = server
    client = Client(url, verbose=False)
    scene = _scene(tmp_path / "masks.png", seed=7)
    prompt = "red square, blue circle"
    drawn, table, status, rles = client.predict(
        handle_file(scene), prompt, 0.0, 0.25, False, 0.5, True, api_name="/detect"
    )
    classes = [p.strip() for p in prompt.split(",")]
    output = expected_output(predictor, scene, classes)
    boxes = output["instances"].pred_boxes.tensor
    assert_rows_equal(table["data"], expected_rows(predictor, scene, classes))
    assert status.endswith("a mask each.") and len(rles) == len(boxes) > 0
    image = cv2.imread(scene)
    stage = MaskStage.from_pretrained(sam_folder)
    want = stage(np.ascontiguousarray(image[:, :, ::-1]), boxes)
    for rle, mask, logits in zip(rles, want.masks, want.logits):
        assert rle["size"] == list(image.shape[:2]) and isinstance(rle["counts"], str)
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        differ = torch.from_numpy(decoded.astype(bool)) != mask
        assert not differ.any() or logits[differ].abs().max() < 1e-4  # only at the threshold
    assert cv2.imread(drawn).shape == image.shape
    assert client.predict(handle_file(scene), prompt, api_name="/detect")[3] == []


def test_masks_without_a_segmenter_are_refused_and_old_drawings_removed(predictor, tmp_path):
    import gradio as gr

    from grounding_dino.web.app import Detector, ResultFiles

    results = ResultFiles(keep=1, folder=str(tmp_path / "results"))
    detector = Detector(predictor=predictor, max_pixels=10**6, results=results)
    scene = _scene(tmp_path / "scene.png", seed=3)
    with pytest.raises(gr.Error, match="This server has no segmenter, so it cannot give masks"):
        detector(scene, "red square", 0.0, 0.25, False, 0.5, True)
    paths = [detector(scene, "red square", 0.0, 0.25, False, 0.5)[0] for _ in range(2)]
    assert paths[0] != paths[1]
    assert os.listdir(tmp_path / "results") == [os.path.basename(paths[1])]  # the older removed


def test_soak_200_requests_8_at_a_time_with_hostile_uploads(server, tmp_path):
    """200 requests, 8 at a time, every fifth one hostile: each gets its answer or its message,
    the server keeps serving, and its memory does not grow (nothing decodes a hostile upload
    before the size check: a 20000x20000 gray PNG decoded is 400 MB, 1.2 GB as RGB)."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url, pid = server
    client = Client(url, verbose=False)
    scenes = [
        _scene(tmp_path / f"s{i}.png", seed=100 + i, height=96 + 16 * i, width=128)
        for i in range(4)
    ]
    hostile = [
        (gray_png_bomb(tmp_path / "bomb.png"), "too many pixels to decode, a decompression bomb?"),
        (
            gray_png_bomb(tmp_path / "gray.png", 9000, 9000),
            "9000x9000 = 81,000,000 pixels, more than the limit",
        ),
        (truncated_png(tmp_path / "truncated.png"), "The upload cannot be used: cannot be decoded"),
        (not_an_image(tmp_path / "notes.png"), "The upload cannot be used: not an image"),
    ]

    def request(index: int) -> str:
        """What the request got: "ok", or the expected message of a hostile upload."""
        if index % 5 == 4:
            path, message = hostile[(index // 5) % len(hostile)]
            try:
                client.predict(handle_file(path), "cat", 0.0, 0.25, False, 0.5, api_name="/detect")
            except AppError as error:
                assert message in str(error), (path, str(error))
                return message
            raise AssertionError(f"{path} was accepted")
        _, table, status, _ = client.predict(
            handle_file(scenes[index % len(scenes)]),
            "red square, blue circle",
            0.0,
            0.25,
            False,
            0.5,
            api_name="/detect",
        )
        assert re.match(r"\d+ boxes \(", status) and len(table["data"]) > 0, status
        return "ok"

    peak_before = _memory_kb(pid, "VmHWM")
    start = time.time()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(request, range(20)))
        rss_20 = _memory_kb(pid, "VmRSS")
        answers += list(pool.map(request, range(20, 200)))
    elapsed = time.time() - start
    rss_200, peak_after = _memory_kb(pid, "VmRSS"), _memory_kb(pid, "VmHWM")

    assert len(answers) == 200 and answers.count("ok") == 160
    assert {a for a in answers if a != "ok"} == {message for _, message in hostile}
    print(
        f"\nsoak: 200 requests (40 hostile), 8 at a time, in {elapsed:.1f} s "
        f"({200 / elapsed:.1f} requests/s); server RSS {rss_20 / 1024:.0f} MB after 20, "
        f"{rss_200 / 1024:.0f} MB after 200; peak {peak_before / 1024:.0f} MB before, "
        f"{peak_after / 1024:.0f} MB after"
    )
    assert rss_200 <= rss_20 + 300 * 1024, (rss_20, rss_200)
    assert peak_after <= peak_before + 300 * 1024, (peak_before, peak_after)


def test_uploads_reach_the_handler_undecoded(tmp_path):
    """The page's image input hands over the uploaded file's path without opening it (Gradio's
    own gr.Image opens every upload with PIL and converts non-RGB ones in memory)."""
    from gradio.data_classes import FileData

    from grounding_dino.web import app

    notes = not_an_image(tmp_path / "notes.png")  # PIL could not even open it
    upload = app.image_upload(label="Image")
    assert upload.preprocess(FileData(path=notes, orig_name="notes.png")) == notes
    assert upload.preprocess(None) is None
    # Subclassing a Gradio component would make Gradio write a .pyi next to the module.
    assert not Path(app.__file__).with_suffix(".pyi").exists()


def test_max_pixels_above_pils_bomb_limit_is_refused(capsys):
    """--max-pixels may not lift PIL's decompression-bomb guard (refused before any model)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("web_demo", REPO / "demo" / "web.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--config-file", "missing.py", "--max-pixels", "2e8"])
    assert exit_info.value.code == 2
    assert "--max-pixels 200000000: more than PIL's decompression-bomb limit of 89478485" in (
        capsys.readouterr().err
    )
