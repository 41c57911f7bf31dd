"""load_image / to_rgb: every input kind, every PIL mode, EXIF orientation, every failure an ImageError."""

from __future__ import annotations

import base64
import contextlib
import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from duomo.data import images
from duomo.data.images import load_image, to_rgb
from duomo.errors import ImageError


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A random-noise RGB image converted to mode."""
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a).convert(mode)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    """img saved to bytes in fmt."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height, with no pixel data: a decompression-bomb stand-in."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- inputs


def test_every_source_kind_gives_the_same_rgb(tmp_path: Path) -> None:
    src = noise(31, 17)
    data = encode(src)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    want = np.asarray(src)
    for source in (str(path), path, data, bytearray(data), io.BytesIO(data), url, src, Image.open(path)):
        img = load_image(source)
        assert img.mode == "RGB" and img.size == (31, 17)
        np.testing.assert_array_equal(np.asarray(img), want)


def test_data_url_with_line_breaks_and_percent_encoding() -> None:
    data = encode(noise(8, 8))
    b64 = base64.b64encode(data).decode()
    wrapped = "\n".join(b64[i : i + 60] for i in range(0, len(b64), 60))
    assert load_image("data:image/png;base64," + wrapped).size == (8, 8)
    from urllib.parse import quote_from_bytes

    assert load_image("data:image/png," + quote_from_bytes(data)).size == (8, 8)


def test_file_object_is_not_closed_and_pil_input_not_modified(tmp_path: Path) -> None:
    buf = io.BytesIO(encode(noise(5, 4, "RGBA")))
    load_image(buf)
    assert not buf.closed
    src = noise(5, 4, "RGBA")
    out = load_image(src)
    assert src.mode == "RGBA" and out.mode == "RGB" and out is not src


def test_file_is_closed_after_loading(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    frames = [noise(6, 6, "P", seed=i) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        img = load_image(path)
    assert img.mode == "RGB" and img.size == (6, 6)


# ---------------------------------------------------------------- modes


def test_sixteen_bit_grayscale_uses_the_full_range(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(16, 16)
    img16 = Image.fromarray(ramp)  # mode I;16
    assert img16.mode == "I;16"
    got = np.asarray(to_rgb(img16))
    assert got.min() == 0 and got.max() == 255 and (got[..., 0] == got[..., 2]).all()
    np.testing.assert_array_equal(got[..., 0], np.rint(ramp / 257).astype(np.uint8))
    # the same through a real 16-bit PNG file (PIL may open it as I;16 or I)
    path = tmp_path / "g16.png"
    img16.save(path)
    np.testing.assert_array_equal(np.asarray(load_image(path)), got)


def test_exact_16_bit_expansion_round_trips() -> None:
    v = np.arange(256, dtype=np.uint16).reshape(16, 16)
    for dtype, mode in [("<u2", "I;16"), (">u2", "I;16B")]:
        img = Image.fromarray((v * 257).astype(dtype))
        assert img.mode == mode
        np.testing.assert_array_equal(np.asarray(to_rgb(img))[..., 0], v)


def test_32_bit_integer_and_float_modes() -> None:
    v = np.arange(256, dtype=np.int32).reshape(16, 16)
    eight = Image.fromarray(v.astype(np.uint8)).convert("I")  # 8-bit data widened: kept as is
    np.testing.assert_array_equal(np.asarray(to_rgb(eight))[..., 0], v)
    sixteen = Image.fromarray(v * 257)  # 16-bit data in mode I, as older PIL opens 16-bit PNGs
    assert sixteen.mode == "I"
    np.testing.assert_array_equal(np.asarray(to_rgb(sixteen))[..., 0], v)
    unit = Image.fromarray((v / 255).astype(np.float32))  # floats in [0, 1]
    assert unit.mode == "F"
    np.testing.assert_array_equal(np.asarray(to_rgb(unit))[..., 0], v)


def test_cmyk_la_and_one_bit() -> None:
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # no black, full magenta + yellow = red
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    la = Image.new("LA", (4, 4), (200, 0))  # alpha is dropped, as OpenCLIP's convert("RGB") does
    assert to_rgb(la).getpixel((0, 0)) == (200, 200, 200)
    one = Image.new("1", (4, 4), 1)
    one.putpixel((0, 0), 0)
    rgb = to_rgb(one)
    assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((1, 1)) == (255, 255, 255)


def test_rgba_drops_alpha_like_openclip() -> None:
    rgba = noise(9, 7, "RGBA")
    rgba.putalpha(0)
    np.testing.assert_array_equal(np.asarray(to_rgb(rgba)), np.asarray(rgba.convert("RGB")))


def test_palette_with_transparency_converts_without_warning(tmp_path: Path) -> None:
    p = Image.new("P", (4, 4), 1)
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    p.putpixel((0, 0), 0)
    p.info["transparency"] = 0
    path = tmp_path / "t.png"
    p.save(path, transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for img in (to_rgb(p), load_image(path)):
            assert img.mode == "RGB"
            assert img.getpixel((0, 0)) == (10, 20, 30) and img.getpixel((1, 1)) == (200, 100, 50)


def test_palette_rgba_mode() -> None:
    pa = Image.new("PA", (2, 2))
    pa.putpalette([9, 8, 7] * 256)
    assert to_rgb(pa).getpixel((0, 0)) == (9, 8, 7)


def test_rgb_is_returned_as_is() -> None:
    img = noise(3, 3)
    assert to_rgb(img) is img


# ---------------------------------------------------------------- EXIF


@pytest.mark.parametrize("orientation, size", [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40))])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, size: tuple[int, int]) -> None:
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # red block at the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.jpg"
    img.save(path, quality=95, exif=exif)
    out = load_image(path)
    assert out.size == size
    # where the red corner must end up once displayed upright
    corner = {1: (2, 2), 3: (37, 17), 6: (17, 2), 8: (2, 37)}[orientation]
    r, g, b = out.getpixel(corner)
    assert r > 200 and g < 60 and b < 60


# ---------------------------------------------------------------- failures


def test_missing_path_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_text_file_renamed_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match="not a recognised image") as info:
        load_image(path)
    assert "notes.jpg" in str(info.value)


@pytest.mark.parametrize("data", [b"\x00" * 100, b"garbage bytes", b"", b"\x89PNG\r\n\x1a\n"])
def test_corrupt_bytes(data: bytes) -> None:
    with pytest.raises(ImageError):
        load_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(tmp_path: Path, fmt: str) -> None:
    data = encode(noise(200, 150), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated") as info:
        load_image(path)
    assert "cut." in str(info.value)


def test_corrupt_png_body() -> None:
    data = bytearray(encode(noise(64, 64)))
    data[100:140] = b"\xff" * 40  # inside IDAT: bad CRC / bad zlib stream
    with pytest.raises(ImageError):
        load_image(bytes(data))


def test_bad_data_urls_and_unsupported_sources() -> None:
    for bad in ("data:image/png;base64,@@@not base64@@@", "data:image/png;base64,", "data:nocomma"):
        with pytest.raises(ImageError):
            load_image(bad)
    with pytest.raises(ImageError, match="URL"):
        load_image("https://example.com/cat.jpg")
    with pytest.raises(ImageError):
        load_image(12345)  # type: ignore[arg-type]


def test_decompression_bomb_header_is_refused_before_decoding() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither PIL's warning nor its error may leak
        for w, h in [(100_000, 100_000), (10_000, 10_000)]:  # over PIL's hard limit; between ours and PIL's
            with pytest.raises(ImageError, match="too large|over the limit"):
                load_image(png_header(w, h))


def test_max_pixels_argument_and_module_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(noise(50, 40))
    with pytest.raises(ImageError, match="50x40 = 2,000 pixels"):
        load_image(data, max_pixels=1999)
    assert load_image(data, max_pixels=2000).size == (50, 40)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="over the limit of 100"):
        load_image(data)
    with pytest.raises(ImageError):
        load_image(noise(50, 40))  # PIL images are checked too


def test_no_raw_errors_escape_for_any_prefix(tmp_path: Path) -> None:
    data = encode(noise(40, 30), "JPEG")
    for n in range(0, len(data), 37):
        with contextlib.suppress(ImageError):  # anything else fails the test
            load_image(data[:n])


def test_big_jpegs_can_decode_at_reduced_scale(tmp_path) -> None:  # noqa: ANN001
    """min_side: libjpeg's DCT scaling keeps both sides >= min_side; PNGs and PIL images are untouched."""
    import numpy as np

    from duomo.data.images import load_image

    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8)).resize((3200, 2400))
    big.save(tmp_path / "big.jpg", quality=90)
    big.save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.jpg").size == (3200, 2400)
    small = load_image(tmp_path / "big.jpg", min_side=256)
    assert min(small.size) >= 256 and small.size[0] < 3200 and small.mode == "RGB"
    assert load_image(tmp_path / "big.png", min_side=256).size == (3200, 2400)
    assert load_image(big, min_side=256).size == (3200, 2400)


def test_the_pipeline_embeds_a_reduced_decode_like_the_full_one(tmp_path) -> None:  # noqa: ANN001
    import skimage.data

    import duomo
    from duomo.data.images import load_image

    photo = Image.fromarray(skimage.data.astronaut()).resize((3072, 3072))
    photo.save(tmp_path / "a.jpg", quality=90)
    pipe = duomo.load("shapes-tiny")
    full = pipe.encode_pixels(pipe.transform(load_image(tmp_path / "a.jpg")).unsqueeze(0))
    fast = pipe.encode_image(str(tmp_path / "a.jpg"))
    assert float((full * fast).sum()) > 0.999
