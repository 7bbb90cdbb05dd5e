"""The command line as people run it: `python flux_kontext_optimized.py ...` in a subprocess, on the tiny model."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

from PIL import Image

from tests.live_server import ROOT

MODEL_LOAD_LOG = "building the tiny FLUX.1-Kontext architecture"  # models.py logs it as the tiny model loads


def run_cli(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "FLUX_MODEL": "tiny", "PYTHONUNBUFFERED": "1", **env}
    command = [sys.executable, "flux_kontext_optimized.py", *args]
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)


def run_cli_on_a_terminal(*args: str, timeout: float = 300) -> tuple[int, str]:
    """The CLI with stdout and stderr on a pseudo-terminal, as in an interactive shell: (exit status, output)."""
    environment = {**os.environ, "FLUX_MODEL": "tiny", "PYTHONUNBUFFERED": "1"}
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    command = [sys.executable, "flux_kontext_optimized.py", *args]
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    return process.wait(timeout), b"".join(chunks).decode(errors="replace")


def test_generate_writes_each_image_in_the_format_asked_with_progress_lines(tmp_path):
    source = tmp_path / "in.png"
    Image.new("RGB", (96, 64), (10, 200, 30)).save(source)
    out = tmp_path / "edit.jpg"
    completed = run_cli(
        *("generate", "--prompt", "add a moon", "--image", str(source), "--out", str(out)),
        *("--width", "256", "--height", "256", "--steps", "2", "--seed", "3", "--num-images", "2"),
        *("--output-quality", "80", "--negative-prompt", "blurry", "--true-cfg-scale", "2", "--cache-threshold", "0"),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    for index, seed in ((1, 3), (2, 4)):
        written = tmp_path / f"edit-{index}.jpg"
        with Image.open(written) as image:
            assert (image.format, image.size) == ("JPEG", (256, 256))
        assert f"wrote {written} (256x256, seed {seed})" in completed.stderr
    assert not out.exists()
    # not a terminal: one plain line per denoising step, no bar
    assert "denoising: step 1/2\ndenoising: step 2/2\n" in completed.stderr
    assert "true CFG on" in completed.stderr
    assert "first-block cache 0.0:" in completed.stderr and " 0 skipped" in completed.stderr
    assert "warm-up:" not in completed.stderr  # a one-shot generate runs no warm-up unless asked


def test_generate_on_a_terminal_shows_a_progress_bar_and_warms_up_when_asked(tmp_path):
    out = tmp_path / "t2i.webp"
    status, output = run_cli_on_a_terminal(
        *("generate", "--prompt", "a lighthouse", "--out", str(out), "--warmup"),
        *("--width", "256", "--height", "256", "--steps", "3"),
    )
    assert status == 0, output[-3000:]
    assert "denoising: 100%" in output and "3/3" in output
    assert "step 1/3" not in output
    assert "warm-up:" in output  # the engine's log of its warm-up generations
    with Image.open(out) as image:
        assert (image.format, image.size) == ("WEBP", (256, 256))


def test_generate_edit_follows_the_input_aspect_ratio(tmp_path):
    source = tmp_path / "in.png"
    Image.new("RGB", (200, 400), (10, 200, 30)).save(source)
    out = tmp_path / "out.png"
    completed = run_cli(
        "--model",
        "tiny",
        "generate",
        "--prompt",
        "add a moon",
        "--image",
        str(source),
        "--steps",
        "1",
        "--out",
        str(out),
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert Image.open(out).size == (720, 1456)


def test_generate_above_the_memory_plans_limit_exits_2_naming_it(tmp_path):
    source = tmp_path / "wide.png"
    Image.new("RGB", (1568, 672), (10, 200, 30)).save(source)
    completed = run_cli(
        *("generate", "--prompt", "wider", "--image", str(source), "--out", str(tmp_path / "out.png")),
        *("--steps", "1", "--num-images", "4"),
        FLUX_GPU_MEMORY_GIB="2.54",  # the tiny model on the CPU: a plan that holds 3 such images (test_memory_plan)
    )
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "num_images=4 at 1568x672 (edit)" in completed.stderr and "at most 3 image" in completed.stderr
    assert not list(tmp_path.glob("out*"))


def test_bad_paths_and_fields_exit_2_with_one_line_before_the_model_loads(tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    out = str(tmp_path / "out.png")
    cases = [
        (["--image", str(tmp_path / "missing.png"), "--out", out], "no such file"),
        (["--image", str(tmp_path), "--out", out], "is a folder"),
        (["--out", str(tmp_path / "no" / "such" / "out.png")], "does not exist (create it first)"),
        (["--out", str(tmp_path / "out.bmp")], "name it .png, .jpg or .webp"),
        (["--out", str(tmp_path / "out.png"), "--output-format", "jpeg"], "is a png name but --output-format is jpeg"),
        (["--out", out, "--width", "1000", "--height", "256"], "multiple of 16"),
        (["--out", out, "--num-images", "9"], "--num-images:"),
        (["--out", out, "--output-quality", "80"], "jpeg and webp only"),
        (["--image", str(not_an_image), "--out", out], "--image:"),
    ]
    for flags, message in cases:
        completed = run_cli("generate", "--prompt", "x", *flags)
        assert completed.returncode == 2, (flags, completed.stderr[-2000:])
        assert message in completed.stderr, (flags, completed.stderr[-2000:])
        assert "error: " in completed.stderr
        assert "Traceback" not in completed.stderr
        assert MODEL_LOAD_LOG not in completed.stderr, flags
    assert list(tmp_path.iterdir()) == [not_an_image]


def test_help_shows_the_defaults():
    completed = run_cli("generate", "--help")
    assert completed.returncode == 0
    help_text = " ".join(completed.stdout.split())  # argparse wraps lines
    for default in ("(default: output.png)", "(default: 3.5)", "(default: 1)", "(default: 1.0)", "(default: False)"):
        assert default in help_text
    assert "--negative-prompt" in help_text and "--cache-threshold" in help_text and "--num-images" in help_text
    assert "(default: None)" not in help_text
    bench = run_cli("benchmark", "--help")
    assert "(default: 3)" in bench.stdout and "(default: 1024)" in bench.stdout and "--json" in bench.stdout


def test_benchmark_prints_a_table_and_writes_the_json_report(tmp_path):
    report_path = tmp_path / "report.json"
    flags = ["--runs", "2", "--width", "256", "--height", "256", "--steps", "2", "--mode", "text_to_image"]
    completed = run_cli("benchmark", *flags, "--out", str(report_path), FLUX_WARMUP="false")
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    assert lines[0] == "text_to_image 256x256, 2 steps unipc, 2 timed run(s) after 1 warm-up"
    header = next(line for line in lines if line.startswith("phase (ms)"))
    assert header.split() == ["phase", "(ms)", "median", "p95", "min", "max"]
    for phase in ("text_encoding", "denoising", "decoding", "engine_total", "queue_wait"):
        row = next(line for line in lines if line.startswith(phase + " "))
        assert len(row.split()) == 5 and all(float(cell) >= 0 for cell in row.split()[1:])
    assert any(line.startswith("peak GPU memory") or "peak GPU memory: n/a (CPU)" in line for line in lines)
    report = json.loads(report_path.read_text())
    assert report["params"]["runs"] == 2 and report["params"]["width"] == 256
    assert "warm-up: step 2/2" in completed.stderr and "run 2/2: step 2/2" in completed.stderr

    as_json = run_cli("benchmark", *flags, "--runs", "1", "--json", FLUX_WARMUP="false")
    assert as_json.returncode == 0, as_json.stderr[-3000:]
    assert json.loads(as_json.stdout)["params"]["runs"] == 1


def test_benchmark_refuses_a_size_the_service_would_refuse():
    completed = run_cli("benchmark", "--width", "1000")
    assert completed.returncode == 2
    assert "--width 1000: 256-1568, a multiple of 16" in completed.stderr
    assert MODEL_LOAD_LOG not in completed.stderr
