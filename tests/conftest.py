"""Shared fixtures: a tiny random Qwen2 model built offline with the world builder's helpers, and
deprecation and future warnings made errors."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from world.build import make_init, make_tokenizer  # noqa: E402  (world/ is a namespace package)

torch.set_num_threads(1)  # the machine is shared: stay on one core

# A deprecation or future warning (transformers', torch's, anyone's) raised while our code runs is an
# error: in this process and, through the environment, in every script and process a test starts. So
# the next API change fails CI rather than warning on a user's screen. Not ours to fix: transformers
# (5.0 to 5.25 at least) scripts GPT-BigCode's activations with torch.jit.script at import, and torch's
# own inductor (which vLLM's model inspection imports) defines torch.jit.script_method modules.
WARNINGS_AS_ERRORS = ("error::DeprecationWarning,error::FutureWarning,"
                      "ignore:`torch.jit.script` is deprecated:DeprecationWarning,"
                      "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
os.environ["PYTHONWARNINGS"] = WARNINGS_AS_ERRORS


def pytest_configure(config):
    for rule in WARNINGS_AS_ERRORS.split(","):
        config.addinivalue_line("filterwarnings", rule)


@pytest.fixture(scope="session")
def cpu():
    return common.Dist(0, 1, torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder with the character tokenizer and a tiny Qwen2 (hidden 32, 2 layers, 2 heads) whose
    random weights are saved as safetensors, so every later load gives the same model."""
    folder = tmp_path_factory.mktemp("tiny_model")
    vocab_size = make_tokenizer(folder)
    make_init(folder, vocab_size, hidden=32, layers=2, heads=2)
    model = common.load_model(folder, common.Dist(0, 1, torch.device("cpu")))
    # The default init (std 0.02) gives near-uniform next-token distributions, under which a
    # shifted position or a wrong mask changes the log-probs very little. Larger weights make the
    # model's predictions sharp and position-dependent, so the comparisons in the tests bite.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.lm.save_pretrained(folder)
    assert any(folder.glob("*.safetensors"))
    return folder


@pytest.fixture(scope="session")
def small_eval(tmp_path_factory):
    """--eval-data and --ood-data of 16 ID test problems, for short script runs (a module may define its own)."""
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text("".join((common.WORLD / "test_id.jsonl").read_text().splitlines(keepends=True)[:16]))
    return ["--eval-data", path, "--ood-data", path]


@pytest.fixture(scope="session")
def tok(tiny_model_dir):
    return common.load_tokenizer(tiny_model_dir)


@pytest.fixture
def model(tiny_model_dir, cpu):
    """A fresh copy of the tiny model (fp32, train mode; tests may modify it freely)."""
    torch.manual_seed(0)
    return common.load_model(tiny_model_dir, cpu)
