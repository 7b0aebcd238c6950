"""The finding: `get_timestep_embedding`'s docstring says `max_period` "Controls the maximum
frequency of the embeddings", but the maximum frequency is 1 whatever `max_period` is; `max_period`
sets the minimum.

Fails on diffusers 0.42.1 as installed (the docstring), passes on a copy with `fix.patch` applied.
It imports diffusers normally, so `PYTHONPATH=<patched copy> pytest test_finding.py` tests the copy.
The tests take no fixtures, so `groundup.contrib` can also call them in-process.
"""

import math

import torch
from diffusers.models.embeddings import get_timestep_embedding

DIM = 16  # half_dim = 8 frequencies


def frequencies(max_period: float, shift: float) -> torch.Tensor:
    """The angular frequencies the function uses, read back from its output at t = 1.

    With flip_sin_to_cos=False the first half is sin(w t) and the second cos(w t); every w is at
    most 1, so atan2(sin, cos) at t = 1 returns w itself.
    """
    emb = get_timestep_embedding(torch.tensor([1.0]), DIM, flip_sin_to_cos=False,
                                 downscale_freq_shift=shift, max_period=max_period)[0].double()
    half = DIM // 2
    return torch.atan2(emb[:half], emb[half:])


def max_period_doc() -> str:
    """The text of the `max_period` entry in the docstring (up to the next entry or `Returns`)."""
    lines = get_timestep_embedding.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("max_period"))
    entry = []
    for line in lines[start + 1:]:
        text = line.strip()
        if text.startswith("Returns") or (text.endswith("):") and "(" in text):
            break
        entry.append(text)
    return " ".join(entry)


def test_what_max_period_does():
    """The behaviour (true before and after the patch): the top frequency is 1 for every max_period,
    the bottom one is max_period ** (-(half - 1) / (half - shift)), i.e. 1 / max_period for
    shift = 1."""
    half = DIM // 2
    for shift in (0.0, 1.0):
        for max_period in (10.0, 10_000.0):
            w = frequencies(max_period, shift)
            assert math.isclose(w[0].item(), 1.0, rel_tol=1e-6)
            assert torch.all(w[1:] < w[:-1])  # decreasing
            lowest = max_period ** (-(half - 1) / (half - shift))
            assert math.isclose(w[-1].item(), lowest, rel_tol=1e-4)
    assert math.isclose(frequencies(10_000.0, 1.0)[-1].item(), 1 / 10_000, rel_tol=1e-4)
    # changing max_period a thousandfold leaves the maximum frequency where it was
    assert frequencies(10.0, 0.0)[0].item() == frequencies(10_000.0, 0.0)[0].item()


def test_docstring_says_what_max_period_does():
    """The docstring must not claim that max_period controls the maximum frequency (the finding)."""
    doc = max_period_doc().lower()
    assert "maximum frequency of the embeddings" not in doc, f"max_period is documented as: {doc!r}"
    assert "minimum frequency" in doc, f"max_period is documented as: {doc!r}"
