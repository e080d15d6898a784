"""The commands as users start them: `python tools/NAME.py`, the console scripts, and a plain (non-editable) install.

Every tool answers --help before torch, Lightning, diffusers or open_clip load; every tool has a console
command running the same `main`; after `pip install .` the shipped configs work by short name from any folder.
"""

import re
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import distribution
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

from conftest import REPO, imported_packages, load_tool

TOOLS = sorted(p.stem for p in (REPO / "tools").glob("*.py") if not p.stem.startswith("_"))
HEAVY = {"torch", "pytorch_lightning", "lightning", "diffusers", "open_clip", "gradio"}


@pytest.mark.parametrize("tool", TOOLS)
def test_help_answers_before_any_heavy_library_loads(tool):
    run = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "tools" / f"{tool}.py"), "--help"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("usage:"), run.stderr[-2000:]
    assert not HEAVY & imported_packages(run.stderr)


def test_every_tool_has_a_console_command_with_the_same_main():
    scripts = {e.name: e.value for e in distribution("emerdiff").entry_points if e.group == "console_scripts"}
    expected = {f"emerdiff-{tool.replace('_', '-')}": f"emerdiff.cli.{tool}:main" for tool in TOOLS}
    assert scripts == expected


@pytest.mark.parametrize("mistake, named", [
    (["segmentor.num_masks=-3"], "segmentor.num_masks must be at least 1"),
    (["segmentor.impl=fastest"], "segmentor.impl: fastest is not valid; choose from fast, reference"),
    (["--cfg", "{tmp}/broken.yaml"], "broken.yaml' is not valid YAML"),
    (["model.pretrained={tmp}/missing"], "{tmp}/missing"),
    (["model.pretrained={tmp}/corrupt.safetensors"], "corrupt.safetensors"),
    (["ovseg.vocab=cat,dog", "ovseg.clip_pretrained=openai", "ovseg.clip_model=ViT-B-16",
      "ovseg.clip_cache_dir={tmp}/no_clip"], "ovseg.clip_pretrained"),
    (["--output", "{tmp}/coffee.png"], "--output {tmp}/coffee.png: {tmp}/coffee.png is a file, not a folder"),
    (["--output", "{tmp}/coffee.png/sub"], "{tmp}/coffee.png is a file, not a folder"),
    (["trainer.devices=abc"], "trainer.devices='abc' is not valid"),
    (["output.overlay_alpha=2"], "output.overlay_alpha must be at most 1.0, got 2"),
])
def test_each_user_mistake_is_one_error_line_and_exit_status_2(mistake, named, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without network: nothing may be downloaded
    (tmp_path / "broken.yaml").write_text("segmentor: [unclosed\n")
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    Image.fromarray(data.coffee()).resize((96, 64)).save(tmp_path / "coffee.png")
    args = ["--cfg", "tiny", "--input", str(tmp_path / "coffee.png"), "--output", str(tmp_path / "out"),
            "segmentor.resolution=64", "segmentor.num_masks=2", *[a.format(tmp=tmp_path) for a in mistake]]
    with pytest.raises(SystemExit) as stop:  # in-process: the same handler as the command, without a new interpreter
        load_tool("predict").main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err[-3000:]
    assert err.startswith("error: ") and named.format(tmp=tmp_path) in err and "Traceback" not in err
    assert not (tmp_path / "out" / "config.yaml").exists()


@pytest.mark.parametrize("tool", TOOLS)
def test_every_command_states_the_library_version(tool, capsys):
    import emerdiff

    with pytest.raises(SystemExit) as stop:
        load_tool(tool).main(["--version"])
    assert stop.value.code == 0 and f"(emerdiff {emerdiff.__version__})" in capsys.readouterr().out


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory) -> Path:
    """The package built as a wheel from a copy of the checkout and installed, not editable, into a fresh venv.

    The venv sees the dependencies of the environment running the tests (no download), whether that is a venv,
    a conda env or the system Python: a .pth file adds this interpreter's own site-packages (not its base
    interpreter's, which `--system-site-packages` would give from inside a venv). Its own emerdiff, installed
    from the wheel, comes first on its path.
    """
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    for name in ("emerdiff", "ovseg", "configs"):
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(root / "wheel"), str(source)], check=True, capture_output=True, timeout=600)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    own = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    dependencies = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (Path(own) / "test_dependencies.pth").write_text("\n".join(dependencies) + "\n")
    wheel = next((root / "wheel").glob("emerdiff-*.whl"))
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True, timeout=600)
    return venv


def test_a_plain_install_segments_with_a_short_config_name_from_any_folder(plain_install, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(data.coffee()).resize((96, 64)).save(elsewhere / "coffee.png")
    installed = subprocess.run([str(plain_install / "bin" / "python"), "-c", "import emerdiff; print(emerdiff.__file__)"],
                               cwd=elsewhere, capture_output=True, text=True, check=True).stdout
    assert installed.startswith(str(plain_install))  # the wheel's copy, not this checkout
    run = subprocess.run([str(plain_install / "bin" / "emerdiff-predict"), "--cfg", "tiny", "--input", "coffee.png",
                          "--output", "out", "segmentor.resolution=64", "segmentor.num_masks=2",
                          "trainer.enable_progress_bar=false"],
                         cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (elsewhere / "out" / "coffee.png").is_file() and "1 segmented" in run.stdout


def test_selfcheck_help_shows_output_as_required_and_its_absence_is_a_usage_error(capsys):
    selfcheck = load_tool("selfcheck")
    with pytest.raises(SystemExit):
        selfcheck.main(["--help"])
    usage = " ".join(capsys.readouterr().out.split("\n\n")[0].split())
    assert " --output OUTPUT" in usage and "[--output OUTPUT]" not in usage
    with pytest.raises(SystemExit) as stop:
        selfcheck.main(["--cfg", "tiny"])
    assert stop.value.code == 2 and "the following arguments are required: --output" in capsys.readouterr().err


def test_no_documented_command_writes_into_the_checkout_s_docs():
    """A documented --output under docs/ would overwrite the tracked records (docs/benchmarks/*) when run."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    outputs = {(page.name, out) for page in pages for out in re.findall(r"--output[ =](\S+)", page.read_text())}
    assert outputs and not {(page, out) for page, out in outputs if out.startswith(("docs/", "./docs/"))}


@pytest.mark.parametrize("devices", [1, 4, -1, "auto", "2", "0,2", [0, 2]])
def test_every_device_setting_lightning_accepts_passes_the_early_check(devices):
    from emerdiff.cli.common.trainer import check_devices

    check_devices(devices)  # raises ConfigError otherwise


def test_a_read_only_output_folder_is_refused_before_anything_loads(tmp_path, monkeypatch):
    """As a user without write permission sees it (root may write anywhere, so the permission check is faked)."""
    import os

    from emerdiff.cli.common.arguments import check_output_folder
    from emerdiff.config import ConfigError

    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).endswith("locked"))
    with pytest.raises(ConfigError, match="locked: the output folder is not writable by this user"):
        check_output_folder(tmp_path / "locked")
    with pytest.raises(ConfigError, match="where the output folder would be made, is not writable"):
        check_output_folder(tmp_path / "locked" / "new" / "run")
    check_output_folder(tmp_path / "free" / "run")  # a folder that can be made


def test_each_local_process_of_a_run_takes_its_share_of_the_cores(monkeypatch):
    """trainer.devices=2 on 8 usable cores: the segmentor each process builds sets torch to 4 threads, not 8."""
    import os

    import torch

    from emerdiff.cli.common.arguments import base_parser, load_cli_config, parse_args
    from emerdiff.cli.common.trainer import build_segmentor, build_trainer

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg = load_cli_config(parse_args(base_parser(""), ["--cfg", "tiny", "trainer.accelerator=cpu",
                                                       "trainer.devices=2", "trainer.strategy=ddp"]))
    before = torch.get_num_threads()
    try:
        build_segmentor(cfg, build_trainer(cfg.trainer, enable_checkpointing=False))
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
