"""Chapter 21's upstream contribution: the pure-Python patch applier and the fails-before /
passes-after round trip of `contrib/diffusers/test_finding.py` against copies of the installed
diffusers."""

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from groundup.contrib import PatchError, apply_patch, package_dir, parse_patch, round_trip

ROOT = Path(__file__).resolve().parents[1]
CONTRIB = ROOT / "contrib" / "diffusers"

ORIGINAL = "".join(f"line {i}\n" for i in range(1, 21))
PATCH = """--- a/pkg/mod.py
+++ b/pkg/mod.py
@@ -3,3 +3,4 @@
 line 3
-line 4
+line four
+line four and a half
 line 5
@@ -15,3 +16,2 @@
 line 15
-line 16
 line 17
"""


def test_apply_patch_changes_exactly_the_hunks(tmp_path):
    (tmp_path / "pkg").mkdir()
    target = tmp_path / "pkg" / "mod.py"
    target.write_text(ORIGINAL)
    assert apply_patch(PATCH, tmp_path) == [target]
    want = ORIGINAL.replace("line 4\n", "line four\nline four and a half\n")
    want = want.replace("line 16\n", "")
    assert target.read_text() == want


def test_apply_patch_finds_a_moved_hunk_and_refuses_a_wrong_one(tmp_path):
    (tmp_path / "pkg").mkdir()
    target = tmp_path / "pkg" / "mod.py"
    target.write_text("extra\nextra\n" + ORIGINAL)  # every hunk now two lines lower
    apply_patch(PATCH, tmp_path)
    assert "line four and a half\n" in target.read_text() and "line 16\n" not in target.read_text()
    target.write_text(ORIGINAL.replace("line 5\n", "line 5 changed\n"))
    with pytest.raises(PatchError, match="does not match"):
        apply_patch(PATCH, tmp_path)
    assert target.read_text() == ORIGINAL.replace("line 5\n", "line 5 changed\n")  # nothing written


def test_parse_patch_rejects_a_truncated_hunk():
    with pytest.raises(PatchError, match="truncated"):
        parse_patch(PATCH.rsplit("\n", 3)[0] + "\n")


@pytest.mark.skipif(shutil.which("patch") is None, reason="no `patch` program to compare with")
def test_apply_patch_agrees_with_the_patch_program(tmp_path):
    for name in ("ours", "theirs"):
        (tmp_path / name / "pkg").mkdir(parents=True)
        (tmp_path / name / "pkg" / "mod.py").write_text(ORIGINAL)
    apply_patch(PATCH, tmp_path / "ours")
    subprocess.run(["patch", "-p1", "-s", "-d", str(tmp_path / "theirs")], input=PATCH, text=True,
                   check=True)
    ours, theirs = (tmp_path / name / "pkg" / "mod.py" for name in ("ours", "theirs"))
    assert ours.read_text() == theirs.read_text()


def test_copy_package_links_all_but_the_way_to_the_edited_files(tmp_path):
    from groundup.contrib import copy_package

    src = tmp_path / "installed" / "pkg"
    files = ("__init__.py", "mod.py", "__pycache__/mod.cpython-311.pyc", "sub/a.py", "other/b.py")
    for rel in files:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(ORIGINAL if rel == "mod.py" else "x = 1\n")
    copy = copy_package(src, tmp_path / "copy", editable=["mod.py", "sub/a.py"])
    assert not copy.is_symlink() and not (copy / "sub").is_symlink()    # real on the way
    assert (copy / "other").is_symlink() and (copy / "mod.py").is_symlink()
    assert not (copy / "__pycache__").is_symlink()
    apply_patch(PATCH, tmp_path / "copy")
    assert "line four" in (copy / "mod.py").read_text()
    assert (src / "mod.py").read_text() == ORIGINAL                       # the original untouched
    assert not (copy / "__pycache__" / "mod.cpython-311.pyc").exists()    # stale: gone in the copy
    assert (src / "__pycache__" / "mod.cpython-311.pyc").exists()         # ... not in the original


def test_the_diffusers_patch_applies_to_the_installed_files():
    """Every hunk of fix.patch matches the installed diffusers (checked in memory, nothing
    written)."""
    from groundup.contrib import apply_file_patch

    site = package_dir("diffusers")
    for file_patch in parse_patch((CONTRIB / "fix.patch").read_text()):
        before = (site / file_patch.path).read_text()
        after = apply_file_patch(before, file_patch)
        assert after != before
        claim = "Controls the maximum frequency"
        assert claim in before and claim not in after


def test_finding_fails_before_and_passes_after_the_patch():
    """The round trip: on a copy of the installed diffusers the docstring test fails (the finding is
    real) while the behaviour test passes; on a patched copy both pass. The installed package is
    left as it was."""
    installed = package_dir("diffusers") / "models" / "embeddings.py"
    digest = hashlib.sha256(installed.read_bytes()).hexdigest()
    outcomes = round_trip(CONTRIB / "fix.patch", CONTRIB / "test_finding.py", in_process=True)
    before, after = outcomes["original"], outcomes["patched"]
    assert "groundup-contrib-" in before.imported_from
    assert before.imported_from.endswith("original/diffusers")
    assert after.imported_from.endswith("patched/diffusers")
    assert not before.passed
    assert "FAILED test_docstring_says_what_max_period_does" in before.output
    assert "PASSED test_what_max_period_does" in before.output
    assert after.passed, after.output
    assert hashlib.sha256(installed.read_bytes()).hexdigest() == digest


def test_smallest_full_config_has_every_part_and_the_documented_size():
    """The walk-through's config (chapter 21, section 1): every part present, its size, and the
    shapes."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.activations import GEGLU

    from groundup.contrib import SMALLEST_FULL_CONFIG

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SMALLEST_FULL_CONFIG).eval()
    kinds = [type(m).__name__ for m in unet.modules()]
    for part in ("Timesteps", "TimestepEmbedding", "CrossAttnDownBlock2D", "DownBlock2D",
                 "Transformer2DModel", "BasicTransformerBlock", "UNetMidBlock2DCrossAttn",
                 "UpBlock2D", "CrossAttnUpBlock2D", "Downsample2D", "Upsample2D", "ResnetBlock2D"):
        assert part in kinds, part
    assert kinds.count("BasicTransformerBlock") == 4
    assert sum(isinstance(m, GEGLU) for m in unet.modules()) == 4
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    widths = (block.attn1.to_k.in_features, block.attn2.to_k.in_features, block.attn1.heads)
    assert widths == (8, 12, 2)
    n_params = sum(p.numel() for p in unet.parameters())
    assert n_params == 51_684
    with torch.no_grad():
        out = unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 12)).sample
    assert out.shape == (2, 4, 8, 8)
