"""OpenAI-style TorchScript archives are read as data: exact parameters, and nothing in them runs."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections import OrderedDict

import pytest
import torch
from torch import nn

from duomo.errors import CheckpointError
from duomo.io import detect_format, read_checkpoint, read_torchscript
from duomo.io.files import load_weights

# A small copy of OpenAI's clip/model.py ViT CLIP: the same parameter names, LND layout and QuickGELU.


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, attn_mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        fc = [
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]
        self.mlp = nn.Sequential(OrderedDict(fc))
        self.ln_2 = nn.LayerNorm(width)
        self.attn_mask = attn_mask  # a plain tensor attribute, not a buffer, as in OpenAI's code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self, size: int, patch: int, width: int, layers: int, heads: int, out: int) -> None:
        super().__init__()
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((size // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class OpenAICLIP(nn.Module):
    def __init__(
        self, embed=32, size=32, patch=8, v_width=128, ctx=16, vocab=1000, t_width=64, layers=2
    ) -> None:
        super().__init__()
        self.visual = VisionTransformer(size, patch, v_width, layers, v_width // 64, embed)
        mask = torch.full((ctx, ctx), float("-inf")).triu(1)
        self.transformer = Transformer(t_width, layers, t_width // 64, mask)
        self.token_embedding = nn.Embedding(vocab, t_width)
        self.positional_embedding = nn.Parameter(torch.randn(ctx, t_width) * 0.01)
        self.ln_final = nn.LayerNorm(t_width)
        self.text_projection = nn.Parameter(torch.randn(t_width, embed) * t_width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        for name, value in (("input_resolution", size), ("context_length", ctx), ("vocab_size", vocab)):
            self.register_buffer(name, torch.tensor(value))  # OpenAI's archives carry these as int buffers
        with torch.no_grad():  # non-trivial norms and biases, so that any mix-up shows
            for param in self.parameters():
                if param.ndim == 1:
                    param.add_(torch.randn_like(param) * 0.1)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        x = (self.token_embedding(text) + self.positional_embedding).permute(1, 0, 2)
        x = self.ln_final(self.transformer(x).permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.encode_image(image) @ self.encode_text(text).t()


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, 32, 32, generator=g)
    text = torch.randint(1, 998, (3, 16), generator=g)
    for row, end in enumerate([3, 9, 15]):  # end-of-text (the highest id) at different positions
        text[row, end] = 999
        text[row, end + 1 :] = 0
    return image, text


@pytest.fixture(scope="module")
def reference() -> OpenAICLIP:
    torch.manual_seed(0)
    return OpenAICLIP().eval()


@pytest.mark.parametrize("how", ["trace", "script"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_archive_parameters_are_read_exactly(reference, how, dtype, tmp_path):
    model = OpenAICLIP().eval()
    model.load_state_dict(reference.state_dict())
    scripted = torch.jit.trace(model, example_inputs()) if how == "trace" else torch.jit.script(model)
    path = tmp_path / "ViT-mini.pt"
    torch.jit.save(scripted.to(dtype), str(path))
    got = read_torchscript(path)
    want = {k: v.to(dtype) if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    assert got.keys() == want.keys() == torch.jit.load(str(path)).state_dict().keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def test_openai_archive_loads_into_duomo_with_exact_outputs(reference, tmp_path, duomo_model, compare):
    image, text = example_inputs()
    path = tmp_path / "ViT-mini.pt"
    torch.jit.save(torch.jit.trace(reference, (image, text)), str(path))
    assert detect_format(path) == "openai-jit"
    cfg, sd = read_checkpoint(path)  # no quick_gelu given: OpenAI archives mean QuickGELU
    assert cfg.vision.act == cfg.text.act == "quick_gelu"
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.heads, cfg.text.heads) == (32, 8, 2, 1)
    assert (cfg.embed_dim, cfg.text.context_length, cfg.text.vocab_size, cfg.text.layers) == (32, 16, 1000, 2)
    model = duomo_model(cfg, sd)
    compare(model, reference.encode_image, reference.encode_text, image, text)


def test_plain_openai_state_dict_means_quickgelu(reference, tmp_path):
    torch.save(reference.state_dict(), tmp_path / "sd.pt")
    cfg, _ = read_checkpoint(tmp_path / "sd.pt")
    assert cfg.vision.act == "quick_gelu"


class RunsCommand:
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_archive(path, data_pkl: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", data_pkl)
        archive.writestr("evil/constants.pkl", pickle.dumps(()))
        archive.writestr("evil/version", "3\n")


def test_archive_calling_os_system_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    write_archive(path, pickle.dumps({"weight": RunsCommand(marker)}, protocol=2))
    assert detect_format(path) == "openai-jit"
    with pytest.raises(CheckpointError, match="os.system|posix.system"):
        read_torchscript(path)
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x02ccollections\nOrderedDict\n)R}b.",  # BUILD on something other than a module record
        b"\x80\x02c__torch__\nFoo\n(K\x01tR.",  # a module record "called" with arguments
        b"\x80\x02cbuiltins\ngetattr\n.",  # any other global
        b"\x80\x02(X\x07\x00\x00\x00storageX\x01\x00\x00\x001tQ.",  # a storage without a type
        b"\x80\x02ccollections\nOrderedDict\n)R.",  # not a module
        b"\x80\x02c__torch__\nFoo\n)\x81}(X\x01\x00\x00\x00wK\x01u",  # truncated
        b"\x80\x02c__torch__\nFoo\n)\x81q\x00}(X\x01\x00\x00\x00ah\x00ub.",  # a module containing itself
    ],
)
def test_anything_but_module_data_is_refused(tmp_path, data):
    path = tmp_path / "bad.pt"
    write_archive(path, data)
    with pytest.raises(CheckpointError):
        read_torchscript(path)


def test_pickled_code_in_a_torch_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": RunsCommand(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_weights(tmp_path / "evil.pt")
    assert not marker.exists()


def test_truncated_archive_is_a_checkpoint_error(reference, tmp_path):
    path = tmp_path / "ViT-mini.pt"
    torch.jit.save(torch.jit.trace(reference, example_inputs()), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
