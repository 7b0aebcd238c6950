"""groundup.hub (chapter 25): a Hub-ready folder of chapter 12's model, loadable without the book's package."""

import ast
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from groundup.gpt import GPTConfig
from groundup.hf import GroundUpGPTConfig, GroundUpGPTForCausalLM, make_model_card, register_groundup_gpt
from groundup.hub import AUTO_MAP, code_closure, copy_code, import_blocked, save_for_hub, third_party_imports

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)


def test_code_closure_follows_imports():
    closure = code_closure("hf")
    assert closure[0] == "hf" and "gpt" in closure and "attention" in closure   # gpt imports attention
    assert len(closure) == len(set(closure))
    assert code_closure("basics")[0] == "basics"


def test_copy_code_makes_groundup_imports_relative(tmp_path):
    files = copy_code(tmp_path, "hf")
    assert {f.stem for f in files} == set(code_closure("hf"))
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 1 or not node.module.startswith("groundup"), (f.name, node.module)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("groundup") for a in node.names), f.name
    assert "from .gpt import GPT, GPTConfig" in (tmp_path / "hf.py").read_text()


def test_third_party_imports(tmp_path):
    (tmp_path / "a.py").write_text("import os\nimport numpy as np\nfrom .b import x\nfrom torch.nn import F\n"
                                   "def f():\n    import tqdm.auto\n")
    (tmp_path / "b.py").write_text("from __future__ import annotations\nimport a\nimport json\n")
    assert third_party_imports([tmp_path / "a.py", tmp_path / "b.py"]) == ["numpy", "torch", "tqdm"]


def test_import_blocked_restores_modules():
    import groundup.hf as before
    with import_blocked("groundup"):
        with pytest.raises(ImportError):
            import groundup.hf  # noqa: F401
        with pytest.raises(ImportError):
            import groundup.nonexistent_module  # noqa: F401
    import groundup.hf as after
    assert after is before and sys.modules["groundup.hf"] is before


def test_hub_folder_round_trip(tmp_path):
    torch.manual_seed(0)
    model = GroundUpGPTForCausalLM(GroundUpGPTConfig.from_gpt_config(TINY)).eval()
    card = make_model_card("tiny", val_loss=1.0, bigram_loss=2.0, n_params=1, train_tokens=1, profile="smoke",
                           device="cpu", remote_code=True)
    vocab = list("abcdefghijk")
    folder = tmp_path / "tiny-hub"
    names = {f.name for f in save_for_hub(model, folder, card, vocab)}
    assert {"config.json", "model.safetensors", "README.md", "vocab.json", "hf.py", "gpt.py"} <= names
    assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert json.loads((folder / "vocab.json").read_text()) == vocab
    ids = torch.randint(11, (2, 5))
    with torch.no_grad():
        expected = model(ids).logits
    # trust_remote_code in a fresh interpreter where the book's package cannot be imported: in this process
    # another test may have registered the classes, and transformers then prefers them to the folder's code
    torch.save({"ids": ids, "expected": expected}, tmp_path / "io.pt")
    code = ("import sys, torch; sys.modules['groundup'] = None; "
            "from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval(); "
            "assert type(m).__module__.startswith('transformers_modules.'), type(m).__module__; "
            f"d = torch.load({str(tmp_path / 'io.pt')!r}); "
            "torch.set_grad_enabled(False); "
            "assert torch.equal(m(d['ids']).logits, d['expected']), 'logits differ'")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    register_groundup_gpt()
    local = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(local) is GroundUpGPTForCausalLM
    with torch.no_grad():
        assert torch.equal(local(ids).logits, expected)
    assert dataclasses.asdict(local.config.gpt_config()) == dataclasses.asdict(TINY)
