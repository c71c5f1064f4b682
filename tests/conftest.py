import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def tokenizer():
    from nanorlhf import world
    return world.make_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm(tokenizer):
    """A random tiny Llama with the world's vocabulary (no training): cheap for equivalence tests."""
    from nanorlhf import world
    return world.make_model(tokenizer, seed=1).eval()


@pytest.fixture(scope="session")
def world_root(tmp_path_factory):
    """The built-in world, built once per test session (about 30 s) unless NANORLHF_WORLD points to one."""
    from nanorlhf import world
    root = os.environ.get("NANORLHF_WORLD") or str(tmp_path_factory.mktemp("w") / "world")
    os.environ["NANORLHF_WORLD"] = root
    return world.ensure(root)
